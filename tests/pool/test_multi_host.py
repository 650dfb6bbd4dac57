"""Three hosts (127.0.0.2-4) x four members, each member its own process.

Each bound is the one docs/pool.md documents for the defaults (INTERVAL = i =
0.25 s, L = 1 s) times SLACK, as the machine is small and shared.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from mesh.pool.master import query_status
from mesh.pool.tracker import BroadcastResult, Outcome

from .cluster import Cluster, kill, wait_for

pytestmark = pytest.mark.slow

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
INTERVAL, L = 0.25, 1.0
SLACK = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("pool-cluster")
    c = Cluster(root, HOSTS, per_host=4, issuer_host="127.0.0.2")
    try:
        c.start()
        c.converge()
        yield c
    finally:
        c.close()


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    cluster.heal()
    cluster.converge()
    return cluster


class Background:
    """A broadcast running on another thread while the test breaks things."""

    def __init__(self, c: Cluster, payload: bytes, timeout: float) -> None:
        self.timeout = timeout
        self.box: list[BroadcastResult] = []
        self.thread = threading.Thread(
            target=lambda: self.box.append(c.broadcast(payload, timeout))
        )
        self.thread.start()

    def result(self) -> BroadcastResult:
        self.thread.join(self.timeout + 5)
        return self.box[0]


def status_members(c: Cluster, host: str) -> set[str]:
    record = c.master_record(host)
    assert record is not None
    context = zmq.Context()
    try:
        status = query_status(context, str(record["peer_endpoint"]), timeout=2.0)
    finally:
        context.term()
    assert status is not None
    return {m["id"] for m in status["members"]}


def member_id(c: Cluster, host: str, pid: int) -> str:
    for path in (c.runtime_dir(host) / "p.members").iterdir():
        if json.loads(path.read_text())["pid"] == pid:
            return path.name
    raise AssertionError(f"no member file for pid {pid}")


def assert_next_broadcast_complete(c: Cluster, after: float) -> None:
    """One broadcast, ``after`` seconds past the new record, reaches everyone."""
    time.sleep(after)
    result = c.broadcast(b"after-takeover", timeout=10.0)
    assert result.complete, result
    assert not result.unreachable_hosts, result
    assert result.counts[Outcome.REPLIED] == 11, result


def test_twelve_replies_from_three_hosts(healthy: Cluster) -> None:
    result = healthy.broadcast(b"hello")
    assert result.complete
    assert result.counts[Outcome.REPLIED] == 12
    assert {m.host for m in result.replies} == set(HOSTS)
    assert len({m.pid for m in result.replies}) == 12
    assert all(r.endswith(b":hello") for r in result.replies.values())


def test_sigkilled_member_is_failed_before_the_deadline(healthy: Cluster) -> None:
    victim = healthy.member_proc("127.0.0.4")
    gather = Background(healthy, b"sleep:1.5:k", timeout=20.0)
    time.sleep(0.6)
    kill(victim)
    started = time.monotonic()
    result = gather.result()
    # The others still sleep 0.9 s; the victim is failed within L.
    assert time.monotonic() - started < max(0.9, L) * SLACK
    (dead,) = result.with_outcome(Outcome.FAILED)
    assert dead.member.pid == victim.pid
    assert result.counts[Outcome.REPLIED] == 11
    assert result.complete


def test_sigstopped_member_mid_handler_is_reported(healthy: Cluster) -> None:
    victim = healthy.member_proc("127.0.0.3")
    gather = Background(healthy, b"sleep:1.5:s", timeout=20.0)
    time.sleep(0.6)
    os.kill(victim.pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        result = gather.result()
    finally:
        kill(victim)
    assert time.monotonic() - started < (L + INTERVAL) * SLACK
    (stuck,) = result.with_outcome(Outcome.FAILED)
    assert stuck.member.pid == victim.pid
    assert "heartbeat" in stuck.reason
    assert result.counts[Outcome.REPLIED] == 11


def test_stopped_member_is_still_listed_after_its_master_dropped_it(
    healthy: Cluster,
) -> None:
    host = "127.0.0.3"
    victim = healthy.member_proc(host)
    victim_id = member_id(healthy, host, victim.pid)
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        # Documented: a hung member is dropped within L + i = 1.25 s.
        wait_for(
            lambda: victim_id not in status_members(healthy, host),
            (L + INTERVAL) * SLACK,
        )
        result = healthy.broadcast(b"after-stop", timeout=10.0)
    finally:
        kill(victim)
    assert result.complete
    (stuck,) = result.with_outcome(Outcome.FAILED)
    assert stuck.member.id == victim_id
    assert stuck.reason.startswith("silent since")
    assert result.counts[Outcome.REPLIED] == 11


def test_sigkilled_master_is_replaced(healthy: Cluster) -> None:
    host = "127.0.0.3"
    old = healthy.master_record(host)
    assert old is not None
    kill(healthy.master_proc(host))

    def replaced() -> bool:
        new = healthy.master_record(host)
        return new is not None and new["epoch"] == old["epoch"] + 1

    took = wait_for(replaced, timeout=10.0)
    assert took < INTERVAL * SLACK
    assert_next_broadcast_complete(healthy, after=INTERVAL)
    healthy.heal()
    healthy.converge(budget=30.0)


def test_broadcast_in_flight_ends_when_a_remote_master_is_replaced(
    healthy: Cluster,
) -> None:
    # The successor greets the issuer's master before the liveness window
    # runs out, so only the epoch change can end the broadcast early.
    host = "127.0.0.3"
    gather = Background(healthy, b"sleep:1.5:r", timeout=12.0)
    time.sleep(0.6)
    kill(healthy.master_proc(host))
    killed = time.monotonic()
    result = gather.result()
    # Bound: the handlers' remaining 0.9 s or L = 1 s, x3 for a loaded machine.
    assert time.monotonic() - killed < max(0.9, L) * SLACK
    assert result.complete
    failed = result.with_outcome(Outcome.FAILED)
    assert {m.member.host for m in failed} == {host}
    assert len(failed) == 4
    assert all(f"master of {host} lost" in m.reason for m in failed)
    assert result.counts[Outcome.REPLIED] == 8
    assert result.counts[Outcome.TIMED_OUT] == 0


def test_sigkilled_master_of_the_issuing_host_is_replaced(healthy: Cluster) -> None:
    host = "127.0.0.2"
    old = healthy.master_record(host)
    assert old is not None
    kill(healthy.master_proc(host))
    took = wait_for(
        lambda: (healthy.master_record(host) or {}).get("epoch") == old["epoch"] + 1,
        timeout=10.0,
    )
    assert took < INTERVAL * SLACK
    assert_next_broadcast_complete(healthy, after=INTERVAL)
    healthy.heal()
    healthy.converge(budget=30.0)


def test_sigstopped_master_is_killed_by_quorum_and_replaced(healthy: Cluster) -> None:
    host = "127.0.0.4"
    old = healthy.master_record(host)
    assert old is not None
    master = healthy.master_proc(host)
    os.kill(master.pid, signal.SIGSTOP)
    try:
        took = wait_for(
            lambda: (
                (healthy.master_record(host) or {}).get("epoch") == old["epoch"] + 1
            ),
            timeout=15.0,
        )
        # The members killed it: SIGKILL, not our cleanup.
        assert master.wait(5) == -signal.SIGKILL
    finally:
        kill(master)
    assert took < (L + 3 * INTERVAL) * SLACK
    assert_next_broadcast_complete(healthy, after=INTERVAL)
    healthy.heal()
    healthy.converge(budget=30.0)


def test_late_reply_never_mixed_into_the_next_broadcast(healthy: Cluster) -> None:
    first = healthy.broadcast(b"sleep:1.5:late", timeout=0.5)
    assert first.complete
    assert first.counts[Outcome.REPLIED] == 0
    second = healthy.broadcast(b"next", timeout=15.0)
    assert second.complete
    assert second.counts[Outcome.REPLIED] == 12
    assert all(r.endswith(b":next") for r in second.replies.values())
    assert first.broadcast_id != second.broadcast_id
