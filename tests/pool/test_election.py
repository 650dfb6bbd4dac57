"""Election rules (pure) and the runtime-dir half (real files, no sockets)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.pool.election import (
    Election,
    MasterRecord,
    MasterState,
    MasterWatch,
    kill_quorum,
    process_alive,
    process_start_time,
)


def record(epoch: int = 1, pid: int = 100) -> MasterRecord:
    return MasterRecord("127.0.0.2", "tcp://x:1", "tcp://x:2", pid, 5, epoch, "m0")


def test_watch_states() -> None:
    w = MasterWatch(liveness_timeout=1.0)
    assert w.state(0.0, process_alive=True) is MasterState.NONE
    assert w.observe_record(record(), 0.0)
    assert not w.observe_record(record(), 0.1)
    assert w.state(0.5, True) is MasterState.CONNECTING
    w.heard(0.6)
    assert w.state(1.5, True) is MasterState.HEALTHY
    assert w.state(1.6, True) is MasterState.HUNG
    assert w.state(1.6, False) is MasterState.NONE
    # A new master gets a fresh liveness window.
    assert w.observe_record(record(epoch=2), 2.0)
    assert w.state(2.5, True) is MasterState.CONNECTING
    assert w.silent_for(2.5) == 0.5


def test_kill_quorum_is_a_majority_of_live_members_but_the_master() -> None:
    live = {"m0", "m1", "m2", "m3"}
    assert not kill_quorum({"m1"}, live, "m0")
    assert kill_quorum({"m1", "m2"}, live, "m0")
    # Votes of dead members and of the master itself do not count.
    assert not kill_quorum({"m1", "m9", "m0"}, live, "m0")
    assert not kill_quorum(set(), {"m0"}, "m0")
    assert kill_quorum({"m1"}, {"m0", "m1"}, "m0")


def test_process_start_time_names_one_process() -> None:
    me = process_start_time(os.getpid())
    assert me is not None and process_alive(os.getpid(), me)
    assert not process_alive(os.getpid(), me + 1)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_start_time(child.pid) is None


def test_lock_is_exclusive_and_freed_on_release(tmp_path: Path) -> None:
    a = Election(tmp_path, "p", "a")
    b = Election(tmp_path, "p", "b")
    assert a.try_acquire() and a.is_master
    assert not b.try_acquire()
    assert b.lock_held_elsewhere()
    a.release()
    assert b.try_acquire()
    b.release()


def test_record_roundtrip_and_epochs(tmp_path: Path) -> None:
    e = Election(tmp_path, "p", "a")
    assert e.read_record() is None and e.next_epoch() == 1
    assert e.try_acquire()
    e.write_record(record(epoch=7))
    assert e.read_record() == record(epoch=7)
    assert e.next_epoch() == 8
    assert not any(p.name.startswith(".p.master") for p in tmp_path.iterdir())


def test_members_votes_and_single_killer(tmp_path: Path) -> None:
    start = process_start_time(os.getpid())
    assert start is not None
    a, b, c = (Election(tmp_path, "p", n) for n in "abc")
    a.join(os.getpid(), start)
    b.join(os.getpid(), start)
    c.join(999_999_999, 1)  # a member whose process is gone
    assert a.live_members() == {"a", "b"}
    a.vote(3)
    b.vote(3)
    assert a.votes(3) == {"a", "b"}
    assert a.claim_kill(3, now=100.0, stale_after=1.0)
    assert not b.claim_kill(3, now=100.5, stale_after=1.0)
    # The claim is no vote.
    assert a.votes(3) == {"a", "b"}
    a.prune_votes(4)
    assert a.votes(3) == set()
    b.leave()
    assert a.live_members() == {"a"}


def test_claim_of_a_dead_claimant_is_taken_over(tmp_path: Path) -> None:
    # The claimant exits right after claiming, as if it died before killing.
    code = (
        "import sys, time; from pathlib import Path; "
        "from mesh.pool.election import Election; "
        "sys.exit(0 if Election(Path(sys.argv[1]), 'p', 'x')"
        ".claim_kill(3, time.monotonic(), 60.0) else 1)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    b, c = Election(tmp_path, "p", "b"), Election(tmp_path, "p", "c")
    now = time.monotonic()
    assert b.claim_kill(3, now, stale_after=60.0)
    # b is alive and its claim fresh: nobody else may kill now.
    assert not c.claim_kill(3, now + 1.0, stale_after=60.0)


def test_stalled_claim_is_taken_over_after_the_window(tmp_path: Path) -> None:
    a, b = Election(tmp_path, "p", "a"), Election(tmp_path, "p", "b")
    assert a.claim_kill(3, now=100.0, stale_after=1.0)
    assert not b.claim_kill(3, now=100.9, stale_after=1.0)
    assert b.claim_kill(3, now=101.5, stale_after=1.0)
    assert not a.claim_kill(3, now=101.6, stale_after=1.0)


def test_kill_master_survives_a_refused_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    start = process_start_time(os.getpid())
    assert start is not None
    me = MasterRecord("h", "e", "e", os.getpid(), start, 1, "m")
    monkeypatch.setattr(os, "kill", refuse)
    assert not Election(tmp_path, "p", "a").kill_master(me)


def test_kill_master_refuses_a_reused_pid(tmp_path: Path) -> None:
    e = Election(tmp_path, "p", "a")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = process_start_time(child.pid)
        assert start is not None
        wrong = MasterRecord("h", "e", "e", child.pid, start + 1, 1, "m")
        assert not e.kill_master(wrong)
        assert child.poll() is None
        right = MasterRecord("h", "e", "e", child.pid, start, 1, "m")
        assert e.kill_master(right)
        assert child.wait(5) == -9
    finally:
        child.kill()
        child.wait()
