"""The Hit wire protocol: frame layouts, encoding and validation.

Every message is one zmq multipart message whose first frame is a fixed
20-byte header and whose other frames depend on the kind::

    header = magic "SM" | version u8 | kind u8 | hit id u64 | request id u64

    OPEN   client -> server   [metadata, limits?]  a JSON object, hit id 0
    OK     server -> client   []                OPEN or CLOSE succeeded
    BUSY   server -> client   [reason]          cap reached or draining
    ERROR  server -> client   [type, message]   the handler or the protocol failed
    CALL   client -> server   [method, args...]
    REPLY  server -> client   [frames...]
    CLOSE  client -> server   []
    PING   client -> server   []                liveness while a call runs
    PONG   server -> client   [size?]

The server picks the hit id when it answers OPEN. Request ids are chosen by
the client, unique within a Hit, and echoed in the answer, which is how a
client recognises and drops a stale reply. Text frames are UTF-8. Payload
frames are opaque: this module never copies them, it only checks their count.

OPEN's optional ``limits`` frame is a JSON object with the client's
``max_message_size`` and ``max_frames``: the server refuses to send a reply
past them (ERROR ``MessageTooLarge``) instead of sending one the client's
socket would drop. A PONG's optional ``size`` frame (decimal) announces the
byte count of the answer that follows it on the wire, so the client does not
mistake the time that answer takes to arrive for a silent server.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from mesh.errors import MessageTooLarge, ProtocolError

__all__ = [
    "HEADER_SIZE",
    "Header",
    "Kind",
    "Message",
    "decode",
    "decode_header",
    "encode",
    "encode_header",
    "encode_open",
    "frame_size",
]

_MAGIC = b"SM"
_VERSION = 1
_HEADER = struct.Struct("!2sBBQQ")
HEADER_SIZE = _HEADER.size

# Longest method name we accept: long enough for any Python identifier anyone
# writes by hand, short enough that a garbage frame is not decoded as one.
_MAX_METHOD = 256


class Kind(enum.IntEnum):
    OPEN = 1
    OK = 2
    BUSY = 3
    ERROR = 4
    CALL = 5
    REPLY = 6
    CLOSE = 7
    PING = 8
    PONG = 9


# (fewest frames after the header, most frames or None for "any number")
_FRAME_COUNTS: dict[Kind, tuple[int, int | None]] = {
    Kind.OPEN: (1, 2),
    Kind.OK: (0, 0),
    Kind.BUSY: (1, 1),
    Kind.ERROR: (2, 2),
    Kind.CALL: (1, None),
    Kind.REPLY: (0, None),
    Kind.CLOSE: (0, 0),
    Kind.PING: (0, 0),
    Kind.PONG: (0, 1),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    kind: Kind
    hit_id: int
    request_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """A decoded message; ``frames`` are the frames after the header."""

    kind: Kind
    hit_id: int
    request_id: int
    frames: tuple[memoryview, ...] = ()

    @property
    def header(self) -> Header:
        return Header(self.kind, self.hit_id, self.request_id)

    def text(self, index: int) -> str:
        try:
            return str(self.frames[index], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(
                f"{self.kind.name} frame {index + 1} is not UTF-8"
            ) from None

    @property
    def method(self) -> str:
        """The method name of a CALL."""
        return self.text(0)

    @property
    def args(self) -> tuple[memoryview, ...]:
        """The argument frames of a CALL."""
        return self.frames[1:]

    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata object of an OPEN."""
        try:
            value = json.loads(bytes(self.frames[0]))
        except (ValueError, RecursionError):
            # ValueError covers bad UTF-8 and bad JSON; RecursionError is
            # what deeply nested brackets raise, and a peer can send those.
            raise ProtocolError("OPEN metadata is not JSON") from None
        if not isinstance(value, dict):
            raise ProtocolError(
                f"OPEN metadata is a JSON {type(value).__name__}, not an object"
            )
        return value

    @property
    def limits(self) -> tuple[int, int] | None:
        """An OPEN's ``(max_message_size, max_frames)`` for replies, if given."""
        if len(self.frames) < 2:
            return None
        try:
            value = json.loads(bytes(self.frames[1]))
            size, frames = value["max_message_size"], value["max_frames"]
        except (ValueError, RecursionError, TypeError, KeyError):
            raise ProtocolError(
                "OPEN limits are not a JSON object of two sizes"
            ) from None
        if not all(type(n) is int and n > 0 for n in (size, frames)):
            raise ProtocolError(f"OPEN limits {size!r}, {frames!r} are not sizes")
        return size, frames

    @property
    def announced(self) -> int:
        """The byte count a PONG announces (0: none)."""
        if not self.frames:
            return 0
        raw = bytes(self.frames[0])
        if not raw.isdigit() or len(raw) > 20:
            raise ProtocolError(f"PONG size {raw[:32]!r} is not a decimal count")
        return int(raw)


def frame_size(frame: Any) -> int:
    """Bytes in one frame given as bytes, a buffer, a zmq.Frame or a str."""
    if isinstance(frame, bytes | bytearray):
        return len(frame)
    if isinstance(frame, str):
        return len(frame.encode())
    if hasattr(frame, "buffer"):
        return int(frame.buffer.nbytes)
    return memoryview(frame).nbytes


def encode_header(kind: Kind, hit_id: int, request_id: int) -> bytes:
    return _HEADER.pack(_MAGIC, _VERSION, kind, hit_id, request_id)


def decode_header(frame: Any) -> Header:
    """Validate and decode a header frame (bytes, buffer or zmq.Frame)."""
    raw = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if raw.nbytes != HEADER_SIZE:
        raise ProtocolError(f"header is {raw.nbytes} bytes, expected {HEADER_SIZE}")
    magic, version, kind, hit_id, request_id = _HEADER.unpack(raw)
    if magic != _MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != _VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    try:
        return Header(Kind(kind), hit_id, request_id)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None


def _check_count(kind: Kind, count: int) -> None:
    low, high = _FRAME_COUNTS[kind]
    if count < low or (high is not None and count > high):
        want = str(low) if low == high else f"at least {low}"
        raise ProtocolError(
            f"{kind.name} has {count} frames after the header, {want} expected"
        )


def decode(frames: Sequence[Any]) -> Message:
    """Decode a whole message; raises :class:`ProtocolError` on anything odd."""
    if not frames:
        raise ProtocolError("empty message")
    header = decode_header(frames[0])
    rest = tuple(
        f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames[1:]
    )
    _check_count(header.kind, len(rest))
    message = Message(header.kind, header.hit_id, header.request_id, rest)
    if header.kind is Kind.CALL:
        if not 0 < rest[0].nbytes <= _MAX_METHOD:
            raise ProtocolError(f"method name of {rest[0].nbytes} bytes")
        message.method  # noqa: B018 - validates the UTF-8 now, not later
    elif header.kind is Kind.OPEN:
        message.metadata  # noqa: B018 - validates the JSON now, not later
        message.limits  # noqa: B018
    elif header.kind is Kind.PONG:
        message.announced  # noqa: B018
    elif header.kind in (Kind.BUSY, Kind.ERROR):
        for i in range(len(rest)):
            message.text(i)
    return message


def encode(
    kind: Kind, hit_id: int, request_id: int, frames: Sequence[Any] = ()
) -> list[Any]:
    """The frames of a message, header first; payload frames pass through."""
    _check_count(kind, len(frames))
    return [encode_header(kind, hit_id, request_id), *frames]


def encode_open(
    request_id: int,
    metadata: Mapping[str, Any],
    max_message_size: int | None = None,
    max_frames: int | None = None,
) -> list[Any]:
    """An OPEN; with limits given, they are sent and the metadata is held to them."""
    frames = [json.dumps(dict(metadata)).encode()]
    if max_message_size is not None and max_frames is not None:
        if len(frames[0]) > max_message_size:
            raise MessageTooLarge(
                f"OPEN metadata of {len(frames[0])} bytes is over the limit of "
                f"{max_message_size}",
                len(frames[0]),
                max_message_size,
            )
        limits = {"max_message_size": max_message_size, "max_frames": max_frames}
        frames.append(json.dumps(limits).encode())
    return encode(Kind.OPEN, 0, request_id, frames)


def encode_error(hit_id: int, request_id: int, type_name: str, text: str) -> list[Any]:
    return encode(Kind.ERROR, hit_id, request_id, [type_name.encode(), text.encode()])
