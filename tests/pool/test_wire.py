"""A master drops what no pool member or master would send (issue 6).

Each test runs one real :class:`Master` on 127.0.0.2 and talks to it from
raw sockets: a fake member on its local endpoint, fake peers of hosts
127.0.0.3 and up on its peer endpoint. After every bad message the master
still runs and still answers a status query.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import mesh.pool.master
from mesh.pool.election import Election, MasterRecord
from mesh.pool.master import (
    MAX_BROADCAST_TIMEOUT,
    ROUTE_GRACE,
    Master,
    decode,
    encode,
    query_status,
)

HOST = "127.0.0.2"
MemberFactory = Callable[[str], zmq.Socket[bytes]]


class StaticDirectory:
    """DNS as a fixed list of masters; registering does nothing."""

    def __init__(self, masters: list[tuple[str, str]]) -> None:
        self.masters = masters

    def resolve(self, pool: str) -> list[tuple[str, str]]:
        return self.masters

    def register(self, pool: str, host: str, port: int) -> Callable[[], None]:
        return lambda: None


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def start_master(
    tmp_path: Path, context: zmq.Context[Any]
) -> Iterator[Callable[..., Master]]:
    started: list[Master] = []
    election = Election(tmp_path, "p", "m0")
    assert election.try_acquire()

    def start(directory: StaticDirectory | None = None, **limits: Any) -> Master:
        master = Master(
            context,
            "p",
            HOST,
            "m0",
            election,
            directory,
            heartbeat_interval=limits.pop("heartbeat_interval", 0.5),
            heartbeat_liveness=4,
            **limits,
        )
        master.start()
        started.append(master)
        return master

    yield start
    for master in started:
        master.stop()
    election.release()


def dealer(context: zmq.Context[Any], endpoint: str, identity: str = "") -> Any:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.connect(endpoint)
    return sock


def status(
    context: zmq.Context[Any], master: Master, via: Any = None
) -> dict[str, Any]:
    """The master's status; asked ``via`` a peer socket, it reflects everything
    that socket sent before, as one connection keeps its order."""
    assert master.record is not None
    if via is None:
        answer = query_status(context, master.record.peer_endpoint, timeout=5.0)
    else:
        via.send_multipart([b"STATUS", b"{}"])
        while (frames := recv(via))[0] != b"STATUS":
            pass
        answer = decode(frames[1])
    assert answer is not None, "the master did not answer a status query"
    assert master.running
    return answer


def peer_hb(host: str, endpoint: object, epoch: object = 1) -> list[bytes]:
    header = {"host": host, "endpoint": endpoint, "epoch": epoch}
    return [b"HB", json.dumps(header).encode()]


def fwd(host: str, endpoint: str, bid: str, timeout: object) -> list[bytes]:
    header = {
        "bid": bid,
        "host": host,
        "epoch": 1,
        "endpoint": endpoint,
        "timeout": timeout,
        "exclude": None,
    }
    # json.dumps writes inf and NaN as Infinity and NaN, which json.loads reads.
    return [b"FWD", json.dumps(header).encode(), b"payload"]


def fake_member(context: zmq.Context[Any], record: MasterRecord) -> Any:
    """A member that joins and never answers, so forwarded routes stay open."""
    member = dealer(context, record.endpoint, "m1")
    member.send_multipart(
        [b"HB", encode({"id": "m1", "host": HOST, "pid": os.getpid()})]
    )
    return member


def recv(sock: Any, timeout: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "nothing received in time"
    frames: list[bytes] = sock.recv_multipart()
    return frames


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_peer_heartbeat_with_a_bad_endpoint_is_dropped(
    context: zmq.Context[Any], start_master: Callable[..., Master]
) -> None:
    master = start_master()
    assert master.record is not None
    peer = dealer(context, master.record.peer_endpoint)
    for endpoint in [
        "bogus",
        "ipc:///tmp/x",
        "tcp://127.0.0.3",
        "tcp://127.0.0.3:0",
        "tcp://127.0.0.3:99999",
        "tcp://127.0.0.3:-5",
        "tcp://[::1:5",
        "tcp://example.invalid:5555",
        "tcp://127.0.0.4:5555",  # not the host the heartbeat names
        12,
        None,
    ]:
        peer.send_multipart(peer_hb("127.0.0.3", endpoint))
    # Not an address, an infinite epoch, this master's own host.
    peer.send_multipart(peer_hb("example.invalid", "tcp://example.invalid:5555"))
    peer.send_multipart(peer_hb("127.0.0.3", "tcp://127.0.0.3:5555", 1e400))
    peer.send_multipart(peer_hb(HOST, f"tcp://{HOST}:5555"))
    assert status(context, master, peer)["peers"] == []
    peer.send_multipart(peer_hb("127.0.0.3", "tcp://127.0.0.3:5555"))
    assert [p["host"] for p in status(context, master, peer)["peers"]] == ["127.0.0.3"]


def test_a_connect_error_leaves_no_dealer(
    tmp_path: Path, context: zmq.Context[Any]
) -> None:
    master = Master(context, "p", HOST, "m0", Election(tmp_path, "p", "m0"), None, 1, 4)
    # Endpoints from DNS reach connect without the wire checks.
    master._ensure_dealer("tcp://127.0.0.3:-5")
    master._ensure_dealer("nonsense://x")
    assert master._dealers == {}


def test_deeply_nested_or_huge_headers_are_dropped(
    context: zmq.Context[Any], start_master: Callable[..., Master]
) -> None:
    master = start_master()
    assert master.record is not None
    peer = dealer(context, master.record.peer_endpoint)
    member = dealer(context, master.record.endpoint, "m1")
    nested = b"[" * 100_000 + b"]" * 100_000
    huge = encode({"host": "127.0.0.3", "pad": "x" * 2_000_000})
    for sock in (peer, member):
        sock.send_multipart([b"HB", nested])
        sock.send_multipart([b"HB", huge])
        sock.send_multipart([b"HB"] + [b""] * 5000)
    answer = status(context, master, peer)
    assert (answer["peers"], answer["members"]) == ([], [])


def test_forwarded_timeouts_are_clamped_and_must_be_finite(
    context: zmq.Context[Any], start_master: Callable[..., Master]
) -> None:
    master = start_master()
    assert master.record is not None
    member = fake_member(context, master.record)
    wait_until(lambda: len(status(context, master)["members"]) == 1)
    peer = dealer(context, master.record.peer_endpoint)
    endpoint = "tcp://127.0.0.3:5555"
    for bid, timeout in [("inf", math.inf), ("nan", math.nan), ("text", "10")]:
        peer.send_multipart(fwd("127.0.0.3", endpoint, bid, timeout))
    peer.send_multipart(fwd("127.0.0.3", endpoint, "huge", 1e300))
    # The only request the member gets is the one with a finite timeout.
    kind, bid, request, _ = recv(member)
    assert (kind, bid) == (b"REQ", b"huge")
    assert decode(request)["timeout"] == MAX_BROADCAST_TIMEOUT
    assert status(context, master, peer)["broadcasts"] == 1
    left = master._routes["huge"].expires - time.monotonic()
    assert left <= MAX_BROADCAST_TIMEOUT + ROUTE_GRACE


def test_forwarded_routes_are_bounded_by_max_pending_broadcasts(
    context: zmq.Context[Any], start_master: Callable[..., Master]
) -> None:
    master = start_master(max_pending=2)
    assert master.record is not None
    # Kept open: a member that went away would settle the routes at once.
    _member = fake_member(context, master.record)
    wait_until(lambda: len(status(context, master)["members"]) == 1)
    # A peer master of 127.0.0.3 that hears what the master sends back.
    origin = context.socket(zmq.ROUTER)
    origin.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.3:{origin.bind_to_random_port('tcp://127.0.0.3')}"
    peer = dealer(context, master.record.peer_endpoint)
    for bid in ("b1", "b2", "b3"):
        peer.send_multipart(fwd("127.0.0.3", endpoint, bid, 30.0))
    events: dict[str, list[dict[str, Any]]] = {}
    while "b3" not in events:
        frames = recv(origin)
        if frames[1] == b"EV":
            bid = frames[2].decode()
            events.setdefault(bid, []).extend(decode(h) for h in frames[3::2])
    assert [e["ev"] for e in events["b3"]] == ["host_lost"]
    assert "max_pending_broadcasts is 2" in events["b3"][0]["reason"]
    assert status(context, master, peer)["broadcasts"] == 2
    # An open id cannot be taken over by a second FWD.
    peer.send_multipart(fwd("127.0.0.4", "tcp://127.0.0.4:5555", "b1", 30.0))
    assert status(context, master, peer)["broadcasts"] == 2
    assert master._routes["b1"].origin_host == "127.0.0.3"


def test_forged_peers_are_bounded_and_lost_ones_make_room(
    context: zmq.Context[Any], start_master: Callable[..., Master]
) -> None:
    master = start_master(max_peers=3, heartbeat_interval=0.05)
    assert master.record is not None
    peer = dealer(context, master.record.peer_endpoint)
    for n in range(3, 8):
        peer.send_multipart(peer_hb(f"127.0.0.{n}", f"tcp://127.0.0.{n}:5555"))
    assert len(status(context, master, peer)["peers"]) == 3
    # Once they are lost (liveness 0.2 s), a new one takes the oldest's place.
    wait_until(
        lambda: not any(p["alive"] for p in status(context, master, peer)["peers"])
    )
    peer.send_multipart(peer_hb("127.0.0.9", "tcp://127.0.0.9:5555"))
    hosts = {p["host"] for p in status(context, master, peer)["peers"]}
    assert len(hosts) == 3 and "127.0.0.9" in hosts


def test_a_lost_peer_is_forgotten_unless_dns_still_lists_it(
    context: zmq.Context[Any],
    start_master: Callable[..., Master],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mesh.pool.master, "FORGET_PEER_AFTER", 0.5)
    listed = StaticDirectory([("127.0.0.4", "tcp://127.0.0.4:5555")])
    master = start_master(listed, heartbeat_interval=0.05)
    assert master.record is not None
    peer = dealer(context, master.record.peer_endpoint)
    for n in (4, 5):
        peer.send_multipart(peer_hb(f"127.0.0.{n}", f"tcp://127.0.0.{n}:5555"))
    wait_until(lambda: len(status(context, master, peer)["peers"]) == 2)
    wait_until(lambda: len(status(context, master, peer)["peers"]) == 1)
    (kept,) = status(context, master, peer)["peers"]
    assert (kept["host"], kept["alive"]) == ("127.0.0.4", False)


def test_member_messages_missing_frames_change_nothing(
    context: zmq.Context[Any], start_master: Callable[..., Master]
) -> None:
    master = start_master()
    assert master.record is not None
    member = fake_member(context, master.record)
    # A heartbeat whose id is not the sender's does not seat anyone.
    other = dealer(context, master.record.endpoint, "m2")
    other.send_multipart(
        [b"HB", encode({"id": "m1", "host": HOST, "pid": os.getpid()})]
    )
    wait_until(lambda: len(status(context, master)["members"]) == 1)
    peer = dealer(context, master.record.peer_endpoint)
    peer.send_multipart(fwd("127.0.0.3", "tcp://127.0.0.3:5555", "b1", 30.0))
    assert recv(member)[:2] == [b"REQ", b"b1"]
    member.send_multipart([b"REPLY", b"b1"])  # no payload frame
    member.send_multipart([b"FAILED", b"b1"])  # no reason frame
    member.send_multipart([b"BCAST", encode({"bid": "x", "timeout": 1})])
    assert status(context, master, peer)["broadcasts"] == 1
    assert master._routes["b1"].pending_members == {"m1"}
    assert [m["id"] for m in status(context, master, peer)["members"]] == ["m1"]
    member.send_multipart([b"REPLY", b"b1", b"ok"])
    wait_until(lambda: status(context, master, peer)["broadcasts"] == 0)
