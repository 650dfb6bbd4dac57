"""The wire format and the session cores, without sockets or clocks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import MessageTooLarge, ProtocolError
from mesh.hit import protocol
from mesh.hit.protocol import Kind
from mesh.hit.session import (
    TRANSFER_FLOOR,
    Answer,
    ClientSession,
    ClientState,
    Drop,
    Forward,
    HitState,
    HitTable,
    Start,
    Wait,
)


def header(kind: Kind, hit_id: int = 0, request_id: int = 1) -> protocol.Header:
    return protocol.Header(kind, hit_id, request_id)


def test_encode_decode_round_trip() -> None:
    frames = protocol.encode(Kind.CALL, 7, 9, [b"put", b"name", bytes(10)])
    message = protocol.decode(frames)
    assert (message.kind, message.hit_id, message.request_id) == (Kind.CALL, 7, 9)
    assert message.method == "put"
    assert [bytes(a) for a in message.args] == [b"name", bytes(10)]
    opened = protocol.decode(protocol.encode_open(1, {"user": "ana"}))
    assert opened.metadata == {"user": "ana"}


@pytest.mark.parametrize(
    "frames, complaint",
    [
        ([], "empty"),
        ([b"junk"], "header is 4 bytes"),
        ([b"XX" + bytes(18)], "bad magic"),
        ([protocol.encode_header(Kind.OK, 0, 0)[:2] + b"\x09" + bytes(17)], "version"),
        ([b"SM\x01\x63" + bytes(16)], "unknown message kind"),
        ([protocol.encode_header(Kind.CALL, 1, 1)], "CALL has 0 frames"),
        ([protocol.encode_header(Kind.CALL, 1, 1), b""], "method name"),
        ([protocol.encode_header(Kind.CALL, 1, 1), b"\xff"], "not UTF-8"),
        ([protocol.encode_header(Kind.OPEN, 0, 1), b"[1]"], "not an object"),
        ([protocol.encode_header(Kind.OPEN, 0, 1), b"{"], "not JSON"),
        ([protocol.encode_header(Kind.CLOSE, 1, 1), b"x"], "CLOSE has 1 frames"),
    ],
)
def test_decode_refuses_malformed_frames(frames: list[bytes], complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        protocol.decode(frames)


@given(st.lists(st.binary(max_size=40), max_size=4))
def test_decode_raises_only_protocol_error(frames: list[bytes]) -> None:
    try:
        protocol.decode(frames)
    except ProtocolError:
        pass


def test_table_caps_hits_with_busy_and_drains() -> None:
    ids = iter(range(1, 100))
    table = HitTable(max_hits=2, idle_timeout=10, new_hit_id=lambda: next(ids))
    assert table.from_client(b"a", header(Kind.OPEN), 0) == Start(1)
    assert table.from_client(b"b", header(Kind.OPEN), 0) == Start(2)
    busy = table.from_client(b"c", header(Kind.OPEN), 0)
    assert isinstance(busy, Answer) and busy.kind is Kind.BUSY
    table.worker_gone(2)
    table.draining = True
    busy = table.from_client(b"c", header(Kind.OPEN), 0)
    assert isinstance(busy, Answer) and busy.frames == ("draining",)


def test_table_routes_calls_and_refuses_strangers() -> None:
    table = HitTable(max_hits=5, idle_timeout=10, new_hit_id=lambda: 5)
    table.from_client(b"a", header(Kind.OPEN), 0)
    early = table.from_client(b"a", header(Kind.CALL, 5, 2), 0)
    assert isinstance(early, Answer) and "opening" in early.frames[1]
    assert table.from_worker(header(Kind.OK, 5, 1), 0) == Forward(5, b"a")
    stranger = table.from_client(b"z", header(Kind.CALL, 5, 2), 0)
    assert isinstance(stranger, Answer) and "not yours" in stranger.frames[1]
    unknown = table.from_client(b"a", header(Kind.CALL, 6, 2), 0)
    assert isinstance(unknown, Answer) and unknown.frames[0] == "UnknownHit"
    assert table.from_client(b"a", header(Kind.CALL, 5, 2), 1) == Forward(5)
    assert table.hits[5].state is HitState.CALLING
    pong = table.from_client(b"a", header(Kind.PING, 5, 3), 1)
    assert isinstance(pong, Answer) and pong.kind is Kind.PONG
    again = table.from_client(b"a", header(Kind.CALL, 5, 4), 1)
    assert isinstance(again, Answer) and again.kind is Kind.ERROR
    assert table.from_worker(header(Kind.REPLY, 5, 2), 2) == Forward(5, b"a")
    assert table.hits[5].state is HitState.OPEN
    bad = table.from_client(b"a", header(Kind.REPLY, 5, 5), 2)
    assert isinstance(bad, Answer) and "cannot send REPLY" in bad.frames[1]


def test_table_reaps_only_idle_open_hits() -> None:
    ids = iter(range(1, 100))
    table = HitTable(max_hits=5, idle_timeout=10, new_hit_id=lambda: next(ids))
    for peer in (b"a", b"b"):
        table.from_client(peer, header(Kind.OPEN), 0)
    table.from_worker(header(Kind.OK, 1, 1), 0)
    table.from_worker(header(Kind.OK, 2, 1), 0)
    table.from_client(b"b", header(Kind.CALL, 2, 2), 5)  # a long call
    assert table.idle(9) == []
    assert table.idle(30) == [1]
    assert table.hits[1].state is HitState.CLOSING
    assert isinstance(table.from_client(b"a", header(Kind.CLOSE, 1, 3), 30), Drop)
    assert table.close_all() == [2]


def test_client_session_drops_stale_replies() -> None:
    session = ClientSession(ping_interval=1, liveness_timeout=3)
    session.request(Kind.OPEN, 0, 2)
    assert session.accept(protocol.Message(Kind.OK, 9, 1), 0.1)
    assert session.hit_id == 9 and session.state is ClientState.OPEN
    session.request(Kind.CALL, 1, 10)  # request 2
    assert not session.accept(protocol.Message(Kind.REPLY, 9, 1), 1.1)
    assert not session.accept(protocol.Message(Kind.REPLY, 8, 2), 1.1)
    assert session.accept(protocol.Message(Kind.REPLY, 9, 2), 1.2)
    assert session.state is ClientState.OPEN


def test_client_session_pings_and_gives_up_on_silence() -> None:
    session = ClientSession(ping_interval=1, liveness_timeout=3)
    session.request(Kind.OPEN, 0, 2)
    session.accept(protocol.Message(Kind.OK, 9, 1), 0)
    session.request(Kind.CALL, 10, 60)
    assert session.next_step(10.5) == Wait(1, 0)
    step = session.next_step(11)
    assert step is not None and step.ping == 3
    assert not session.accept(protocol.Message(Kind.PONG, 9, 3), 11.1)
    assert session.next_step(13.5) is not None  # heard at 11.1
    assert session.next_step(14.2) is None  # silent for 3.1 s
    assert session.lost_for(14.2) == pytest.approx(3.1)


def test_metadata_is_json() -> None:
    frames = protocol.encode_open(1, {"n": [1, 2]})
    assert json.loads(frames[1]) == {"n": [1, 2]}


def test_client_session_allows_for_its_own_upload_until_a_later_pong() -> None:
    session = ClientSession(ping_interval=1, liveness_timeout=3)
    session.request(Kind.OPEN, 0, 2)
    session.accept(protocol.Message(Kind.OK, 9, 1), 0)
    size = 10 * TRANSFER_FLOOR  # ten seconds of upload at the floor rate
    session.request(Kind.CALL, 10, 60, size)
    assert session.next_step(22) is not None  # silent 12 s, within 3 + 10
    assert session.next_step(23.1) is None
    # A PONG to a ping sent after the CALL: the upload is over.
    call = session.request(Kind.CALL, 30, 60, size)
    assert not session.accept(protocol.Message(Kind.PONG, 9, call + 1), 31)
    assert session.next_step(33.5) is not None
    assert session.next_step(34.1) is None


def test_client_session_allows_for_an_announced_download() -> None:
    session = ClientSession(ping_interval=1, liveness_timeout=3)
    session.request(Kind.OPEN, 0, 2)
    session.accept(protocol.Message(Kind.OK, 9, 1), 0)
    session.request(Kind.CALL, 10, 60)  # request 2
    announce = protocol.decode(
        protocol.encode(Kind.PONG, 9, 2, [str(5 * TRANSFER_FLOOR).encode()])
    )
    assert not session.accept(announce, 11)
    assert session.next_step(18.5) is not None  # 7.5 s: within 3 + 5
    assert session.next_step(19.1) is None
    assert session.silent(19.1)


def test_open_carries_limits_and_holds_its_metadata_to_them() -> None:
    frames = protocol.encode_open(1, {"n": 1}, 1000, 16)
    assert protocol.decode(frames).limits == (1000, 16)
    assert protocol.decode(protocol.encode_open(1, {})).limits is None
    with pytest.raises(MessageTooLarge) as info:
        protocol.encode_open(1, {"x": "y" * 2000}, 1000, 16)
    assert info.value.limit == 1000


def test_deeply_nested_metadata_is_a_protocol_error_not_a_crash() -> None:
    header = protocol.encode_header(Kind.OPEN, 0, 1)
    with pytest.raises(ProtocolError, match="not JSON"):
        protocol.decode([header, b"[" * 100_000])
