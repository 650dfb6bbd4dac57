"""Several members in this process, one host, no DNS: election and gather."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mesh.config import Settings
from mesh.errors import MasterUnavailable, PoolError
from mesh.pool.member import PoolMember, demo_handler
from mesh.pool.tracker import Outcome

HOST = "127.0.0.1"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(runtime_dir=tmp_path / "run", heartbeat_interval=0.1)


@pytest.fixture
def pool(settings: Settings) -> Iterator[Callable[..., PoolMember]]:
    started: list[PoolMember] = []

    def make(
        handler: Callable[[bytes], bytes] | None = None, **kwargs: object
    ) -> PoolMember:
        member = PoolMember(
            "p", settings, handler or demo_handler(HOST), HOST, directory=None, **kwargs
        )
        member.start()
        started.append(member)
        return member

    yield make
    for member in started:
        member.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_three_members_all_reply(pool: Callable[..., PoolMember]) -> None:
    members = [pool() for _ in range(3)]
    assert all(m.wait_for_master(5.0) for m in members)
    assert sum(m.is_master for m in members) == 1
    result = members[1].broadcast(b"hello", timeout=5.0)
    assert result.complete
    assert result.counts[Outcome.REPLIED] == 3
    assert {m.id for m in result.replies} == {m.info.id for m in members}
    assert all(r.endswith(b":hello") for r in result.replies.values())
    without_me = members[1].broadcast(b"x", timeout=5.0, include_self=False)
    assert members[1].info not in {m.member for m in without_me.members}
    assert without_me.counts[Outcome.REPLIED] == 2


def test_failing_handler_and_quorum(pool: Callable[..., PoolMember]) -> None:
    gate = threading.Event()

    def slow(payload: bytes) -> bytes:
        if payload == b"q":
            gate.wait(10)
        return demo_handler(HOST)(payload)

    fast = [pool() for _ in range(2)]
    pool(slow)
    assert fast[0].wait_for_master(5.0)
    wait_until(lambda: fast[0].broadcast(b"x", timeout=0.5).complete)
    failed = fast[0].broadcast(b"fail:boom", timeout=5.0, quorum=None)
    assert failed.counts[Outcome.FAILED] == 3
    assert all("boom" in m.reason for m in failed.with_outcome(Outcome.FAILED))
    early = fast[0].broadcast(b"q", timeout=5.0, quorum=2)
    assert not early.complete
    assert early.counts[Outcome.REPLIED] == 2
    assert early.counts[Outcome.PENDING] == 1
    gate.set()


def test_working_member_times_out_at_deadline_and_late_reply_is_dropped(
    pool: Callable[..., PoolMember],
) -> None:
    a = pool()
    b = pool()
    assert a.wait_for_master(5.0) and b.wait_for_master(5.0)
    first = a.broadcast(b"sleep:1.0:one", timeout=0.5, include_self=False)
    (entry,) = first.members
    assert entry.outcome is Outcome.TIMED_OUT and entry.worked
    # b is still busy with "one" when "two" arrives; its reply to "one" must
    # not be taken for a reply to "two".
    second = a.broadcast(b"two", timeout=5.0, include_self=False)
    assert second.complete
    assert list(second.replies.values()) == [
        b.info.host.encode() + b"/" + str(b.info.pid).encode() + b":two"
    ]


def test_clean_exit_hands_over_at_once(pool: Callable[..., PoolMember]) -> None:
    members = [pool() for _ in range(3)]
    assert all(m.wait_for_master(5.0) for m in members)
    master = next(m for m in members if m.is_master)
    epoch = master.epoch
    master.close()
    rest = [m for m in members if m is not master]
    wait_until(lambda: any(m.is_master for m in rest), timeout=5.0)
    wait_until(lambda: all(m.epoch == epoch + 1 for m in rest), timeout=5.0)
    wait_until(
        lambda: rest[0].broadcast(b"y", timeout=2.0).counts[Outcome.REPLIED] == 2
    )


def test_no_master_raises_master_unavailable(settings: Settings) -> None:
    member = PoolMember(
        "p", settings, demo_handler(HOST), HOST, directory=None, eligible=False
    )
    member.start()
    try:
        started = time.monotonic()
        with pytest.raises(MasterUnavailable, match="no usable master"):
            member.broadcast(b"x", timeout=5.0)
        assert time.monotonic() - started < 4.0
    finally:
        member.close()


def test_close_fails_open_broadcasts_at_once(
    pool: Callable[..., PoolMember],
) -> None:
    gate = threading.Event()

    def held(payload: bytes) -> bytes:
        gate.wait(20)
        return payload

    pool(held)
    issuer = pool(eligible=False)
    assert issuer.wait_for_master(5.0)
    box: list[BaseException] = []

    def run() -> None:
        try:
            issuer.broadcast(b"x", timeout=60.0)
        except PoolError as exc:
            box.append(exc)

    caller = threading.Thread(target=run)
    caller.start()
    try:
        time.sleep(0.3)
        issuer.close()
        # Well before the broadcast's 60 s, and not a result: an error.
        caller.join(15)
        assert not caller.is_alive()
        assert box and "closed" in str(box[0])
        with pytest.raises(PoolError, match="not running"):
            issuer.broadcast(b"y", timeout=1.0)
    finally:
        gate.set()
        caller.join(15)
