"""Helpers for tests that need a responder: in-process or as a subprocess.

Kept in the package (not in tests/) so every part's tests, and scripts, can
start a responder the same way.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import dns.name
import dns.tsig

from mesh.errors import ConfigError
from mesh.keyfile import generate_key_file, load_key, load_keyring
from mesh.responder.server import Responder

__all__ = ["DnsProcess", "RunningResponder", "read_line", "start_responder"]


@dataclasses.dataclass
class RunningResponder:
    """What the ``responder`` fixture yields."""

    responder: Responder
    key_file: Path
    key: dns.tsig.Key
    state_dir: Path
    zone: str

    @property
    def address(self) -> str:
        return self.responder.address

    @property
    def host(self) -> str:
        return self.responder.host

    @property
    def port(self) -> int:
        return self.responder.port

    @property
    def keyring(self) -> dict[dns.name.Name, dns.tsig.Key]:
        return {self.key.name: self.key}


def start_responder(
    tmp: Path,
    zone: str = "mesh.internal.",
    min_lease: float = 0.5,
    **options: object,
) -> RunningResponder:
    """Start a responder on 127.0.0.1, port 0, with a fresh key in ``tmp``."""
    key_file = tmp / "tsig.key"
    if not key_file.exists():
        generate_key_file(key_file)
    state_dir = tmp / "state"
    responder = Responder(
        zone=zone,
        listen=("127.0.0.1", 0),
        keyring=load_keyring(key_file),
        state_dir=state_dir,
        min_lease=min_lease,
        **options,  # type: ignore[arg-type]
    )
    responder.start()
    return RunningResponder(responder, key_file, load_key(key_file), state_dir, zone)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line ``proc`` writes to its stdout pipe, waiting at most
    ``timeout`` seconds; ``""`` if it wrote none in time or exited.

    Only for a process's first lines: it waits on the pipe itself, so text
    already in the stream's buffer is not seen as ready.
    """
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return ""
    return proc.stdout.readline()


class DnsProcess:
    """``mesh dns`` as a real subprocess, for kill and restart tests.

    The same ``tmp`` directory across instances keeps the key and journal,
    so a restarted process serves what the killed one acknowledged.
    """

    def __init__(
        self,
        tmp: Path,
        port: int = 0,
        *extra: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.key_file = tmp / "tsig.key"
        self.state_dir = tmp / "state"
        self.requested_port = port
        self.extra = list(extra)
        self.env = dict(env or {})
        # Every instance in ``tmp`` appends its stderr here, so a test can
        # read what the process logged (and check what it must never log).
        self.stderr_path = tmp / "mesh-dns.stderr"
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def start(self, timeout: float = 20.0) -> DnsProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("MESH_CONFIG", None)
        env.update(self.env)
        cmd = [
            sys.executable,
            "-m",
            "mesh",
            "dns",
            "--listen",
            f"127.0.0.1:{self.requested_port}",
            "--state-dir",
            str(self.state_dir),
            "--key-file",
            str(self.key_file),
            "--min-lease",
            "0.5",
            *self.extra,
        ]
        if not self.key_file.exists():
            generate_key_file(self.key_file)
        with open(self.stderr_path, "a") as stderr:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        # The process prints one "listening host:port" line once bound.
        line = read_line(self.proc, timeout)
        if not line.startswith("listening "):
            self.kill()
            raise ConfigError(
                f"mesh dns did not start within {timeout:.0f} s (said {line!r})"
            )
        self.address = line.split()[1]
        return self

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def __enter__(self) -> DnsProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
