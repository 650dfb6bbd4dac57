"""One host of member processes: kill switch off, the CLI, clean signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.config import Settings
from mesh.errors import MasterUnavailable

from .cluster import REPO, Cluster, kill, wait_for

pytestmark = pytest.mark.slow

HOST = "127.0.0.5"


@pytest.fixture
def no_kill(tmp_path: Path) -> Iterator[Cluster]:
    settings = Settings(runtime_dir=tmp_path / f"run-{HOST}", kill_hung_master=False)
    c = Cluster(
        tmp_path,
        [HOST],
        per_host=3,
        issuer_host=HOST,
        extra_args=["--no-kill-hung-master"],
        settings=settings,
    )
    try:
        c.start()
        c.converge()
        yield c
    finally:
        c.close()


def test_hung_master_with_kill_off_fails_fast_and_recovers(no_kill: Cluster) -> None:
    master = no_kill.master_proc(HOST)
    os.kill(master.pid, signal.SIGSTOP)
    try:

        def refused() -> bool:
            started = time.monotonic()
            try:
                no_kill.broadcast(b"x", timeout=10.0)
            except MasterUnavailable as exc:
                assert time.monotonic() - started < 1.0
                return "kill_hung_master is off" in str(exc)
            return False

        wait_for(refused, timeout=15.0)
        # Nobody killed it: the switch is off.
        time.sleep(1.0)
        assert master.poll() is None
    finally:
        os.kill(master.pid, signal.SIGCONT)
    no_kill.converge(budget=20.0)


def test_cli_broadcast_prints_a_table(no_kill: Cluster) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh",
            "broadcast",
            "--pool",
            "p",
            "--host",
            HOST,
            "--runtime-dir",
            str(no_kill.runtime_dir(HOST)),
            "--directory-dir",
            str(no_kill.directory),
            "--timeout",
            "10",
            "hi",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr.decode()
    assert text.splitlines()[0].split() == [
        "MEMBER",
        "HOST",
        "PID",
        "OUTCOME",
        "DETAIL",
    ]
    # Two subprocess members plus the test's own member; not the CLI itself.
    assert text.count(" replied ") == 3
    assert "complete; 3 replied" in text


def test_sigterm_exits_cleanly_and_leaves_the_pool(no_kill: Cluster) -> None:
    proc = no_kill.member_proc(HOST)
    members_dir = no_kill.runtime_dir(HOST) / "p.members"
    before = len(list(members_dir.iterdir()))
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(10) == 0
    finally:
        kill(proc)
    assert len(list(members_dir.iterdir())) == before - 1
    result = no_kill.broadcast(b"after", timeout=10.0)
    assert result.complete
    assert proc.pid not in {m.member.pid for m in result.members}
