"""No silent drops on the answer path (FAILURE-MODES C05), without sockets.

A full queue towards the issuer, or from a member to its master, is retried
until the broadcast can no longer use it; only then is it dropped, loudly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import zmq

from mesh.pool.election import Election
from mesh.pool.master import Master, _Route, decode
from mesh.pool.member import _Answers


class FullSocket:
    """Takes frames only while ``full`` is false, like a ROUTER at its HWM."""

    def __init__(self) -> None:
        self.full = True
        self.sent: list[bytes] = []

    def send(self, frame: bytes, flags: int) -> None:
        if self.full:
            raise zmq.Again()
        self.sent.append(frame)


def make_master(tmp_path: Path) -> tuple[Master, FullSocket]:
    master = Master(
        zmq.Context.instance(),
        "p",
        "127.0.0.1",
        "m0",
        Election(tmp_path, "p", "m0"),
        None,
        heartbeat_interval=0.25,
        heartbeat_liveness=4,
    )
    sock = FullSocket()
    master._local = sock  # type: ignore[assignment]
    return master, sock


def test_master_retries_events_the_issuers_queue_refused(tmp_path: Path) -> None:
    master, sock = make_master(tmp_path)
    route = _Route("127.0.0.1", "issuer", expires=time.monotonic() + 10)
    master._to_origin("b1", route, {"ev": "reply", "member": "m1"}, b"one")
    master._flush()
    assert sock.sent == []
    master._to_origin("b1", route, {"ev": "reply", "member": "m2"}, b"two")
    sock.full = False
    master._flush()
    identity, kind, bid, *events = sock.sent
    assert (identity, kind, bid) == (b"issuer", b"EV", b"b1")
    # Both answers, the refused one first.
    assert [decode(h)["member"] for h in events[::2]] == ["m1", "m2"]
    assert events[1::2] == [b"one", b"two"]


def test_master_drops_refused_events_loudly_once_the_route_expired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    master, sock = make_master(tmp_path)
    route = _Route("127.0.0.1", "issuer", expires=time.monotonic() - 1)
    master._to_origin("b1", route, {"ev": "reply", "member": "m1"}, b"x")
    with caplog.at_level(logging.WARNING, logger="mesh.pool.master"):
        master._flush()
    assert not master._outbox
    assert "dropping 1 events of broadcast b1" in caplog.text


def test_member_answers_wait_in_order_until_their_deadline() -> None:
    answers = _Answers()
    taken: list[list[bytes]] = []
    open_ = False

    def send(frames: list[bytes]) -> bool:
        if open_:
            taken.append(frames)
        return open_

    answers.add([b"REPLY", b"b1", b"x"], deadline=10.0)
    answers.add([b"REPLY", b"b2", b"y"], deadline=20.0)
    assert answers.flush(send, now=1.0) == []
    assert answers and taken == []
    # The first one's deadline passed while the queue stayed full.
    open_ = True
    assert answers.flush(send, now=15.0) == [[b"REPLY", b"b1", b"x"]]
    assert taken == [[b"REPLY", b"b2", b"y"]]
    assert not answers
