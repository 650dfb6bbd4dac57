"""`mesh workload`: its pure parts, and runs against real servers and DNS."""

from __future__ import annotations

import argparse
import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.config import Settings
from mesh.discovery.register import Registrar
from mesh.errors import ConfigError
from mesh.examples.blobstore import BlobStore
from mesh.hit.server import HitServer
from mesh.workload import (
    HitReport,
    WorkloadFile,
    default_files,
    load_files,
    local_address_towards,
    percentiles,
    run,
    share_files,
    summarize,
)


def _files(n: int) -> list[WorkloadFile]:
    return [WorkloadFile(f"f{i}", b"x", "digest") for i in range(n)]


@pytest.mark.parametrize(("n_files", "hits"), [(10, 3), (3, 10), (7, 7), (1, 4)])
def test_share_files_uses_every_file_and_gives_every_hit_some(
    n_files: int, hits: int
) -> None:
    files = _files(n_files)
    shares = share_files(files, hits)
    assert len(shares) == hits
    assert all(shares)
    assert {f.name for share in shares for f in share} == {f.name for f in files}


def test_percentiles() -> None:
    samples = [float(i) for i in range(1, 101)]
    p50, p90, p99 = percentiles(samples, (50, 90, 99))
    assert p50 == pytest.approx(50.5)
    assert p90 == pytest.approx(90.1)
    assert p99 == pytest.approx(99.01)
    assert percentiles([], (50,)) == [0.0]
    assert percentiles([3.0], (50, 99)) == [3.0, 3.0]


def test_default_files_are_stdlib_modules_including_large_ones() -> None:
    named = default_files()
    assert len(named) >= 24
    assert any(name.startswith("json/") for name, _ in named)
    assert max(path.stat().st_size for _, path in named) > 100_000


def test_load_files_walks_directories_and_hashes(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_bytes(b"alpha")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    loose = tmp_path / "c"
    loose.write_bytes(b"")
    files = load_files([str(tmp_path / "d"), str(loose)])
    by_name = {f.name: f for f in files}
    assert set(by_name) == {"d/a.txt", "d/sub/b.bin", str(loose)}
    assert by_name["d/a.txt"].sha256 == (
        "8ed3f6ad685b959ead7022518e1af76cd816f8e8ec7ccdda1ed4018e8f2223f8"
    )
    with pytest.raises(ConfigError, match="not a file or directory"):
        load_files([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no files"):
        load_files([str(tmp_path / "empty")])


@dataclasses.dataclass(frozen=True)
class _Target:
    host: str
    port: int
    name: str
    priority: int
    weight: int

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


def test_summary_shows_hits_beside_the_weights() -> None:
    targets = [
        _Target("127.0.0.2", 1000, "a.mesh.internal.", 0, 3),
        _Target("127.0.0.3", 2000, "b.mesh.internal.", 0, 1),
        _Target("127.0.0.4", 3000, "c.mesh.internal.", 1, 5),
    ]
    reports = [
        HitReport(
            0, "tcp://127.0.0.2:1000", calls=4, bytes_sent=100, latencies=[0.001]
        ),
        HitReport(1, "tcp://127.0.0.2:1000", calls=4, bytes_received=50),
        HitReport(2, "tcp://127.0.0.3:2000", calls=2, latencies=[0.003]),
    ]
    out = io.StringIO()
    summarize(reports, targets, None, out)
    lines = out.getvalue().splitlines()
    row_a = next(line for line in lines if "127.0.0.2:1000" in line).split()
    row_c = next(line for line in lines if "127.0.0.4:3000" in line).split()
    # Weights 3 and 1 compete at priority 0; priority 1 is only a backup.
    assert row_a[-4:] == ["3", "75%", "2", "67%"]
    assert row_c[-4:] == ["5", "-", "0", "0%"]
    assert "calls: 10 in 3 Hits" in out.getvalue()


def test_local_address_towards_loopback() -> None:
    assert local_address_towards("127.0.0.1:5353") == "127.0.0.1"


# ---- runs against real servers registered in the bundled responder -------


class LyingBlobStore(BlobStore):
    """Stores honestly but reports a wrong digest: the workload must notice."""

    def sha256(self, name: memoryview) -> str:
        return "0" * 64


def _args(tmp_path: Path, **kw: Any) -> argparse.Namespace:
    small = tmp_path / "files"
    small.mkdir(exist_ok=True)
    for i in range(6):
        (small / f"file{i}").write_bytes(bytes([i]) * (1000 * (i + 1)))
    values: dict[str, Any] = dict(
        paths=[str(small)],
        service="blobstore",
        hits=6,
        concurrency=3,
        pool="",
        host=None,
        broadcast_timeout=5.0,
        broadcast_budget=5.0,
    )
    values.update(kw)
    return argparse.Namespace(**values)


@pytest.fixture
def registered(responder: Any) -> Iterator[Any]:
    """Start servers registered as _blobstore._tcp in the responder."""
    servers: list[HitServer] = []
    registrar = Registrar([responder.address], responder.zone, responder.key)

    def start(factory: Any, weight: int) -> HitServer:
        server = HitServer(
            factory,
            "127.0.0.1",
            registrar=registrar,
            srv_name=f"_blobstore._tcp.{responder.zone}",
            target=f"h{len(servers)}.{responder.zone}",
            weight=weight,
        ).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _settings(responder: Any, tmp_path: Path) -> Settings:
    return Settings(
        zone=responder.zone,
        nameservers=[responder.address],
        key_file=responder.key_file,
        runtime_dir=tmp_path / "run",
        state_dir=tmp_path / "state",
    )


def test_workload_passes_against_honest_servers(
    registered: Any, responder: Any, tmp_path: Path
) -> None:
    first = registered(BlobStore, 3)
    second = registered(BlobStore, 1)
    out = io.StringIO()
    status = run(_args(tmp_path), _settings(responder, tmp_path), out)
    text = out.getvalue()
    assert status == 0, text
    assert "OK: every answer of" in text
    for server in (first, second):
        assert f"127.0.0.1:{server.port}" in text
    # 6 Hits of one file each: thread, put, sha256, size, get, count, names, thread.
    assert "calls: 48 in 6 Hits" in text


def test_workload_fails_on_a_wrong_answer(
    registered: Any, responder: Any, tmp_path: Path
) -> None:
    registered(LyingBlobStore, 1)
    out = io.StringIO()
    status = run(_args(tmp_path), _settings(responder, tmp_path), out)
    text = out.getvalue()
    assert status == 1
    assert "FAILED: 6 check(s)" in text
    assert "sha256 files/file0: got '0000" in text


def test_workload_fails_when_no_server_answers(responder: Any, tmp_path: Path) -> None:
    from mesh.errors import ServiceNotFound

    with pytest.raises(ServiceNotFound):
        run(_args(tmp_path), _settings(responder, tmp_path), io.StringIO())
