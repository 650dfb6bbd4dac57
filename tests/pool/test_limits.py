"""The pool's bounds (issue 6): refused with a clear error, others unharmed."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from mesh.config import Settings
from mesh.errors import BroadcastRejected
from mesh.pool.election import Election
from mesh.pool.master import query_status
from mesh.pool.member import PoolMember, demo_handler
from mesh.pool.tracker import Outcome

HOST = "127.0.0.1"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Callable[..., PoolMember]]:
    started: list[PoolMember] = []

    def make(**limits: int) -> PoolMember:
        settings = Settings(
            runtime_dir=tmp_path / "run", heartbeat_interval=0.1, **limits
        )
        member = PoolMember("p", settings, demo_handler(HOST), HOST, directory=None)
        member.start()
        assert member.wait_for_master(5.0)
        started.append(member)
        return member

    yield make
    for member in started:
        member.close()


def test_settings_read_the_limits_from_the_environment() -> None:
    env = {"MESH_MAX_POOL_MEMBERS": "7", "MESH_MAX_PENDING_BROADCASTS": "3"}
    settings = Settings.load(env=env)
    assert (settings.max_pool_members, settings.max_pending_broadcasts) == (7, 3)


def test_member_beyond_max_pool_members_is_refused(
    pool: Callable[..., PoolMember], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mesh.pool.master"):
        first, second = pool(max_pool_members=2), pool(max_pool_members=2)
        assert first.broadcast(b"x", timeout=5.0).counts[Outcome.REPLIED] == 2
        third = pool(max_pool_members=2)
        # Refused on its first heartbeat; until that arrives it is told it is
        # no member, also at once.
        wait_for(lambda: "max_pool_members is 2" in rejection(third))
    assert f"refusing member {third.info.id}" in caplog.text
    result = second.broadcast(b"z", timeout=5.0)
    assert result.complete
    assert {m.id for m in result.replies} == {first.info.id, second.info.id}


def test_member_beyond_max_pending_broadcasts_is_rejected_at_once(
    pool: Callable[..., PoolMember], tmp_path: Path
) -> None:
    busy, other = pool(max_pending_broadcasts=2), pool(max_pending_broadcasts=2)
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        slow = [
            executor.submit(busy.broadcast, b"sleep:1:s", timeout=10.0)
            for _ in range(2)
        ]
        # Both are outstanding until their handlers have slept.
        wait_for(lambda: master_routes(tmp_path) == 2)
        with pytest.raises(BroadcastRejected, match="on pool member"):
            busy.broadcast(b"third", timeout=10.0)
        assert all(f.result(15).complete for f in slow)
    assert other.broadcast(b"after", timeout=10.0).counts[Outcome.REPLIED] == 2
    assert busy.broadcast(b"after", timeout=10.0).counts[Outcome.REPLIED] == 2


def test_master_beyond_max_pending_broadcasts_rejects_at_once(
    pool: Callable[..., PoolMember], tmp_path: Path
) -> None:
    a, b = pool(max_pending_broadcasts=2), pool(max_pending_broadcasts=2)
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        slow = [
            executor.submit(a.broadcast, b"sleep:1:s", timeout=10.0) for _ in range(2)
        ]
        wait_for(lambda: master_routes(tmp_path) == 2)
        # b has nothing pending itself; the master counts both of a's.
        with pytest.raises(BroadcastRejected, match="on the master"):
            b.broadcast(b"third", timeout=10.0)
        assert all(f.result(15).complete for f in slow)
    # Settled broadcasts free their slots at once, not at their deadline.
    for _ in range(3):
        assert b.broadcast(b"after", timeout=10.0).counts[Outcome.REPLIED] == 2


def rejection(member: PoolMember) -> str:
    started = time.monotonic()
    with pytest.raises(BroadcastRejected) as info:
        member.broadcast(b"y", timeout=5.0)
    assert time.monotonic() - started < 1.0
    return str(info.value)


def master_routes(tmp_path: Path) -> int:
    record = Election(tmp_path / "run", "p", "test").read_record()
    assert record is not None
    context = zmq.Context()
    try:
        status = query_status(context, record.peer_endpoint, timeout=2.0)
    finally:
        context.term()
    assert status is not None
    return int(status["broadcasts"])


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_frame_beyond_max_message_size_is_refused_by_the_master(
    pool: Callable[..., PoolMember], tmp_path: Path
) -> None:
    from zmq.utils.monitor import recv_monitor_message

    a, b = pool(max_message_size=1024), pool(max_message_size=1024)
    record = Election(tmp_path / "run", "p", "test").read_record()
    assert record is not None
    ctx = zmq.Context()
    try:
        for endpoint in (record.endpoint, record.peer_endpoint):
            flood = ctx.socket(zmq.DEALER)
            flood.setsockopt(zmq.LINGER, 0)
            monitor = flood.get_monitor_socket(
                zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
            )
            flood.connect(endpoint)
            flood.send_multipart([b"HB", b"x" * 1_000_000])
            # The master hangs up on a peer sending more than the limit.
            events = []
            deadline = time.monotonic() + 5.0
            while zmq.EVENT_DISCONNECTED not in events:
                assert time.monotonic() < deadline, f"not disconnected: {events}"
                if monitor.poll(100):
                    events.append(recv_monitor_message(monitor)["event"])
            flood.disable_monitor()
            monitor.close(linger=0)
            flood.close()
    finally:
        # destroy, not term: a failed assertion leaves sockets open.
        ctx.destroy(linger=0)
    result = b.broadcast(b"still", timeout=5.0)
    assert result.complete
    assert {m.id for m in result.replies} == {a.info.id, b.info.id}
