"""An example Hit handler: a per-Hit blob store kept in SQLite.

It stands in for a native library that must be driven from one thread: a
``sqlite3`` connection refuses to be used from any thread but the one that
created it, so if srvmesh ever ran two calls of one Hit on different threads,
this handler would fail with ``sqlite3.ProgrammingError``. Each Hit gets its
own in-memory database, filled by ``put`` and queried by the other methods.

Serve it with ``mesh serve mesh.examples.blobstore:BlobStore --service blobs``.
:func:`stats` answers a pool "stats" broadcast with this process's counters.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from typing import Any

__all__ = ["BlobStore", "on_broadcast", "stats"]

_counters_lock = threading.Lock()
_counters = {"hits_opened": 0, "hits_closed": 0, "calls": 0, "bytes_stored": 0}


def _count(**deltas: int) -> None:
    with _counters_lock:
        for name, delta in deltas.items():
            _counters[name] += delta


def stats() -> bytes:
    """This process's counters as JSON, for a pool "stats" broadcast."""
    with _counters_lock:
        counters = dict(_counters)
    counters["pid"] = os.getpid()
    counters["open_hits"] = counters["hits_opened"] - counters["hits_closed"]
    return json.dumps(counters, sort_keys=True).encode()


def on_broadcast(payload: bytes) -> bytes:
    """Answer a pool broadcast: ``stats`` gives :func:`stats`, anything else fails."""
    if payload.strip() == b"stats":
        return stats()
    raise ValueError(f"unknown broadcast {payload[:40]!r}; this member answers 'stats'")


def _name(frame: memoryview) -> str:
    return str(frame, "utf-8")


class BlobStore:
    """One Hit's blobs, in a SQLite database owned by the Hit's thread."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata
        self._db = sqlite3.connect(":memory:")
        self._db.execute(
            "CREATE TABLE blobs (name TEXT PRIMARY KEY, data BLOB NOT NULL)"
        )
        _count(hits_opened=1)

    def put(self, name: memoryview, blob: memoryview) -> str:
        """Store ``blob`` under ``name``; returns its SHA-256 in hex."""
        _count(calls=1, bytes_stored=blob.nbytes)
        self._db.execute(
            "INSERT OR REPLACE INTO blobs VALUES (?, ?)", (_name(name), blob)
        )
        return hashlib.sha256(blob).hexdigest()

    def _blob(self, name: memoryview) -> bytes:
        row = self._db.execute(
            "SELECT data FROM blobs WHERE name = ?", (_name(name),)
        ).fetchone()
        if row is None:
            raise KeyError(f"no blob named {_name(name)!r} in this Hit")
        data: bytes = row[0]
        return data

    def get(self, name: memoryview) -> bytes:
        _count(calls=1)
        return self._blob(name)

    def sha256(self, name: memoryview) -> str:
        _count(calls=1)
        return hashlib.sha256(self._blob(name)).hexdigest()

    def size(self, name: memoryview) -> int:
        _count(calls=1)
        (size,) = self._db.execute(
            "SELECT length(data) FROM blobs WHERE name = ?", (_name(name),)
        ).fetchone() or (None,)
        if size is None:
            raise KeyError(f"no blob named {_name(name)!r} in this Hit")
        return int(size)

    def count(self) -> int:
        _count(calls=1)
        (n,) = self._db.execute("SELECT count(*) FROM blobs").fetchone()
        return int(n)

    def names(self) -> list[str]:
        _count(calls=1)
        return [r[0] for r in self._db.execute("SELECT name FROM blobs ORDER BY name")]

    def thread(self) -> int:
        """The OS thread id serving this Hit: the same for every call."""
        _count(calls=1)
        return threading.get_ident()

    def echo(self, *frames: memoryview) -> tuple[memoryview, ...]:
        """The frames back, uncopied: for round-trip and throughput checks."""
        _count(calls=1)
        return frames

    def close(self) -> None:
        # Also proves close() runs on the Hit's thread: sqlite3 refuses otherwise.
        self._db.close()
        _count(hits_closed=1)
