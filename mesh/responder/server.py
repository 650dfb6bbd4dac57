# The responder's loop: UDP and TCP on one address, answers encoded with
# dnslib, updates handed to update.py.
#
# One thread runs a selector over the UDP socket, the TCP listener and every
# TCP connection, so the zone has a single writer and needs no lock on the hot
# path. Measured on the 2-core development box, a single loop beat a thread
# per request: the work per query is a few microseconds of Python, far less
# than a thread hand-off.
#
# Fast path: a plain query (one question, no answer/authority records, at
# most a bare OPT) is looked up in a cache of pre-encoded replies keyed by
# the lower-cased question and the EDNS size; the ID, the RD bit and the
# question's case as asked are patched in. The cache is thrown away whenever
# the zone's version moves (an update or an expiry) and before any lease ends,
# because the hot path first compares ``now`` with the zone's next deadline.
#
# Bad input: anything we cannot parse gets FORMERR when the 12-byte header is
# readable and is not itself a response, and is dropped otherwise (C16). TCP
# connections that send nothing complete for ``tcp_timeout`` seconds are
# closed, and the oldest connection is closed when the cap is reached, so
# idle clients cannot starve the others of file descriptors.

from __future__ import annotations

import ipaddress
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dnslib

from mesh.config import format_hostport, parse_hostport
from mesh.errors import ConfigError
from mesh.responder.records import Answer, Journal, Record, Zone
from mesh.responder.update import LeasePolicy, UpdateProcessor

__all__ = ["Responder"]

log = logging.getLogger(__name__)

_AXFR = 252
_IXFR = 251
_OPT = 41
_OPCODE_QUERY = 0
_OPCODE_UPDATE = 5

# RFC 1035 section 4.2.1 without EDNS; with EDNS, RFC 6891 lets the client
# ask for more. 4096 caps it: larger UDP replies fragment, and fragments are
# what DNS flag day 2020 told servers to avoid (1232 would be safer still, but
# clients that ask for more on loopback should get it).
_UDP_MIN = 512
_UDP_MAX = 4096
_OUR_EDNS_SIZE = 1232

# Each cached reply is a few hundred bytes; the cap bounds memory when a
# client walks random names, each of which would otherwise get an entry.
_CACHE_MAX = 20000

# How often the loop wakes when nothing happens, to close idle TCP clients.
_SWEEP_INTERVAL = 0.25

# A TCP client that does not read its replies: stop buffering for it.
_TCP_OUT_MAX = 1 << 20


class _TCPConn:
    __slots__ = ("sock", "peer", "inbuf", "outbuf", "last_active")

    def __init__(self, sock: socket.socket, peer: Any, now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.last_active = now


class Responder:
    """The bundled authoritative DNS responder, runnable in-process.

    ``listen`` is ``(host, port)`` or ``"host:port"``; port 0 picks a free
    one, readable from :attr:`address` after :meth:`start`. ``keyring`` maps
    key names to the TSIG keys allowed to update (and to transfer) the zone.
    ``state_dir`` holds the journal; without it nothing survives a restart.
    """

    def __init__(
        self,
        zone: str = "mesh.internal.",
        listen: tuple[str, int] | str = ("127.0.0.1", 5353),
        keyring: Mapping[dns.name.Name, dns.tsig.Key] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        zone_file: str | os.PathLike[str] | None = None,
        default_lease: float = 30.0,
        min_lease: float = 30.0,
        max_lease: float = 24 * 3600.0,
        negative_ttl: int = 5,
        allow_loopback_axfr: bool = True,
        tcp_timeout: float = 3.0,
        max_tcp_connections: int = 128,
    ) -> None:
        if isinstance(listen, str):
            listen = parse_hostport(listen, default_port=5353)
        self.listen = listen
        self.keyring = dict(keyring or {})
        self.allow_loopback_axfr = allow_loopback_axfr
        self.tcp_timeout = tcp_timeout
        self.max_tcp_connections = max_tcp_connections
        self.policy = LeasePolicy(default_lease, min_lease, max_lease)
        self.zone = Zone(zone, negative_ttl=negative_ttl)
        if zone_file is not None:
            count = self.zone.load_file(zone_file)
            log.info("loaded %d static records from %s", count, zone_file)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.journal = (
            Journal(self.state_dir / "journal.json") if self.state_dir else None
        )
        if self.journal is not None:
            restored = self.journal.load(
                self.zone, time.monotonic(), time.time(), max_lease
            )
            if restored:
                log.info(
                    "restored %d leased records from %s", restored, self.journal.path
                )
        self.updates = UpdateProcessor(
            self.zone, self.keyring, self.journal, self.policy
        )
        # Held by the loop while it handles a message; other threads take it
        # to read the zone consistently.
        self.lock = threading.Lock()
        self._cache: dict[tuple[bytes, bytes, int], bytes] = {}
        self._cache_version = -1
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._conns: dict[int, _TCPConn] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._selector: selectors.BaseSelector | None = None
        self.host, self.port = listen

    # ---- lifecycle --------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` the responder listens on (UDP and TCP)."""
        return format_hostport(self.host, self.port)

    def start(self) -> Responder:
        """Bind both sockets and start the loop thread; returns self."""
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tcp = socket.socket(family, socket.SOCK_STREAM)
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            # With port 0, the kernel picks the TCP port and UDP takes the
            # same number; the UDP bind can fail if another process holds it,
            # so try a few times.
            bound_port = tcp.getsockname()[1]
            for attempt in range(20):
                try:
                    udp.bind((host, bound_port))
                    break
                except OSError:
                    if port != 0 or attempt == 19:
                        raise
                    tcp.close()
                    tcp = socket.socket(family, socket.SOCK_STREAM)
                    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    tcp.bind((host, 0))
                    bound_port = tcp.getsockname()[1]
            tcp.listen(128)
        except OSError as exc:
            tcp.close()
            udp.close()
            raise ConfigError(
                f"cannot listen on {format_hostport(host, port)}: {exc.strerror}"
            ) from exc
        tcp.setblocking(False)
        udp.setblocking(False)
        for sock in (udp,):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            except OSError:
                pass
        self._udp, self._tcp = udp, tcp
        self.port = bound_port
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"mesh-dns-{self.port}", daemon=True
        )
        self._thread.start()
        log.info("serving %s on %s (udp, tcp)", self.zone.origin, self.address)
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the loop, close every socket; safe to call twice."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        thread.join(timeout)
        if thread.is_alive():
            log.warning("responder loop did not stop within %.1fs", timeout)
        self._thread = None
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None

    def __enter__(self) -> Responder:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def tcp_connections(self) -> int:
        """How many TCP clients are connected right now."""
        return len(self._conns)

    def records(self) -> list[tuple[Record, float | None]]:
        """Every live record with its remaining lease (``None`` when static)."""
        now = time.monotonic()
        with self.lock:
            if now >= self.zone.next_deadline:
                self.zone.expire(now)
            return [(r, r.lease_remaining(now)) for r in self.zone.records()]

    # ---- the loop ---------------------------------------------------------

    def _run(self) -> None:
        assert self._udp and self._tcp and self._wake_r
        sel = selectors.DefaultSelector()
        self._selector = sel
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_sweep = time.monotonic() + _SWEEP_INTERVAL
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                timeout = max(0.0, min(next_sweep, self.zone.next_deadline) - now)
                for key, events in sel.select(timeout):
                    tag = key.data
                    try:
                        if tag == "udp":
                            self._on_udp()
                        elif tag == "accept":
                            self._on_accept(sel)
                        elif tag == "wake":
                            self._wake_r.recv(64)
                        else:
                            self._on_tcp(sel, tag, events)
                    except Exception:
                        # One bad message must not end the loop for everyone;
                        # nobody else is there to raise to.
                        log.exception("responder loop error (%s)", tag)
                now = time.monotonic()
                if now >= self.zone.next_deadline:
                    with self.lock:
                        self.zone.expire(now)
                if now >= next_sweep:
                    self._sweep_tcp(sel, now)
                    next_sweep = now + _SWEEP_INTERVAL
        finally:
            sel.close()
            self._selector = None

    def _on_udp(self) -> None:
        sock = self._udp
        assert sock is not None
        # Drain everything queued: one select per burst, not per datagram.
        for _ in range(256):
            try:
                data, peer = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP errors from earlier sends surface here on Linux.
                continue
            reply = self.handle(data, peer, tcp=False)
            if reply is not None:
                try:
                    sock.sendto(reply, peer)
                except OSError:
                    pass

    def _on_accept(self, sel: selectors.BaseSelector) -> None:
        assert self._tcp is not None
        while True:
            try:
                sock, peer = self._tcp.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            if len(self._conns) >= self.max_tcp_connections:
                oldest = min(self._conns.values(), key=lambda c: c.last_active)
                log.debug("tcp cap reached: closing %s", oldest.peer)
                self._close(sel, oldest)
            sock.setblocking(False)
            conn = _TCPConn(sock, peer, time.monotonic())
            self._conns[sock.fileno()] = conn
            sel.register(sock, selectors.EVENT_READ, conn)

    def _close(self, sel: selectors.BaseSelector, conn: _TCPConn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _on_tcp(self, sel: selectors.BaseSelector, conn: _TCPConn, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._flush(sel, conn)
        if not events & selectors.EVENT_READ:
            return
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(sel, conn)
            return
        if not chunk:
            self._close(sel, conn)
            return
        conn.inbuf += chunk
        while len(conn.inbuf) >= 2:
            size = (conn.inbuf[0] << 8) | conn.inbuf[1]
            if size < 12:
                # No DNS message is shorter than its header; the stream
                # cannot be resynchronised, so end it.
                self._close(sel, conn)
                return
            if len(conn.inbuf) < 2 + size:
                break
            message = bytes(conn.inbuf[2 : 2 + size])
            del conn.inbuf[: 2 + size]
            conn.last_active = time.monotonic()
            for reply in self._handle_tcp(message, conn.peer):
                conn.outbuf += struct.pack("!H", len(reply)) + reply
        if conn.outbuf:
            self._flush(sel, conn)

    def _flush(self, sel: selectors.BaseSelector, conn: _TCPConn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(sel, conn)
            return
        del conn.outbuf[:sent]
        if len(conn.outbuf) > _TCP_OUT_MAX:
            self._close(sel, conn)
            return
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        if sel.get_key(conn.sock).events != wanted:
            sel.modify(conn.sock, wanted, conn)

    def _sweep_tcp(self, sel: selectors.BaseSelector, now: float) -> None:
        limit = now - self.tcp_timeout
        for conn in list(self._conns.values()):
            if conn.last_active < limit:
                log.debug("closing idle tcp client %s", conn.peer)
                self._close(sel, conn)

    # ---- messages ---------------------------------------------------------

    def _handle_tcp(self, data: bytes, peer: Any) -> list[bytes]:
        if len(data) >= 12 and not data[2] & 0x80 and (data[2] >> 3) & 0xF == 0:
            try:
                record = dnslib.DNSRecord.parse(data)
            except Exception:
                record = None
            if (
                record is not None
                and len(record.questions) == 1
                and record.questions[0].qtype in (_AXFR, _IXFR)
            ):
                return self._transfer(data, peer)
        reply = self.handle(data, peer, tcp=True)
        return [] if reply is None else [reply]

    def handle(self, data: bytes, peer: Any, tcp: bool) -> bytes | None:
        """Answer one message; ``None`` means drop it."""
        now = time.monotonic()
        if len(data) < 12 or data[2] & 0x80:
            return None
        opcode = (data[2] >> 3) & 0xF
        if opcode == _OPCODE_QUERY:
            fast = self._fast(data, now, tcp)
            if fast is not None:
                return fast
            return self._slow_query(data, now, tcp)
        if opcode == _OPCODE_UPDATE:
            with self.lock:
                reply = self.updates.handle(data, now, time.time())
            log.debug("update from %s answered", peer)
            return reply
        return _header_reply(data, dns.rcode.NOTIMP)

    def _fast(self, data: bytes, now: float, tcp: bool) -> bytes | None:
        # Only the common shape: QDCOUNT 1, no answers or authority, and
        # either no additional record or one bare OPT.
        if data[4:10] != b"\x00\x01\x00\x00\x00\x00" or data[10] or data[11] > 1:
            return None
        i = 12
        n = len(data)
        while True:
            if i >= n:
                return None
            length = data[i]
            if length == 0:
                break
            if length & 0xC0:
                return None
            i += length + 1
        qend = i + 1
        if qend + 4 > n:
            return None
        if data[11]:
            opt = data[qend + 4 :]
            # Root owner, type OPT, class = size, TTL (version 0, flags),
            # RDLENGTH 0; anything else goes the slow way.
            if len(opt) != 11 or opt[0:3] != b"\x00\x00\x29" or opt[9:11] != b"\0\0":
                return None
            if opt[6] != 0:
                return None
            size = max(_UDP_MIN, min(_UDP_MAX, (opt[3] << 8) | opt[4]))
        else:
            if qend + 4 != n:
                return None
            size = _UDP_MIN
        limit = 65535 if tcp else size
        if data[11]:
            limit |= 0x10000  # keys with EDNS differ from keys without
        if now >= self.zone.next_deadline or self._cache_version != self.zone.version:
            with self.lock:
                if now >= self.zone.next_deadline:
                    self.zone.expire(now)
                self._cache.clear()
                self._cache_version = self.zone.version
        qname = data[12:qend]
        key = (qname.lower(), data[qend : qend + 4], limit)
        cached = self._cache.get(key)
        if cached is None:
            lowered = data[:12] + key[0] + data[qend:]
            built = self._slow_query(lowered, now, tcp)
            if built is None or built[4:6] != b"\x00\x01":
                # Header-only errors are rare and carry no question to patch.
                return None if built is None else data[0:2] + built[2:]
            cached = b"\x00\x00" + bytes([built[2] & 0xFE]) + built[3:]
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = cached
        # Patch in the ID, the RD bit and the question name as it was asked.
        return (
            data[0:2]
            + bytes([cached[2] | (data[2] & 0x01)])
            + cached[3:12]
            + qname
            + cached[qend:]
        )

    def _slow_query(self, data: bytes, now: float, tcp: bool) -> bytes | None:
        try:
            request = dnslib.DNSRecord.parse(data)
        except Exception:
            # dnslib raises DNSError for most damage, but struct and
            # Unicode errors leak through on odd labels; all mean FORMERR.
            return _header_reply(data, dns.rcode.FORMERR)
        header = request.header
        reply = dnslib.DNSRecord(
            dnslib.DNSHeader(id=header.id, qr=1, aa=1, rd=header.rd, ra=0)
        )
        edns = [rr for rr in request.ar if rr.rtype == _OPT]
        if len(request.questions) != 1 or len(edns) > 1:
            return _header_reply(data, dns.rcode.FORMERR)
        question = request.questions[0]
        reply.add_question(question)
        limit = 65535 if tcp else _UDP_MIN
        if edns:
            opt = edns[0]
            version = (opt.ttl >> 16) & 0xFF
            reply.add_ar(dnslib.EDNS0(udp_len=_OUR_EDNS_SIZE))
            if version != 0:
                # RFC 6891 section 6.1.3: BADVERS (16) is split between the
                # header rcode (0) and the OPT extended rcode (1).
                reply.ar[0] = dnslib.EDNS0(udp_len=_OUR_EDNS_SIZE, ext_rcode=1)
                return bytes(reply.pack())
            if not tcp:
                limit = max(_UDP_MIN, min(_UDP_MAX, opt.rclass))
        if question.qclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            reply.header.rcode = dns.rcode.REFUSED
            return bytes(reply.pack())
        if question.qtype in (_AXFR, _IXFR):
            # Transfers go over TCP (RFC 5936 section 4.2), handled there.
            reply.header.rcode = dns.rcode.REFUSED
            return bytes(reply.pack())
        try:
            qname = dns.name.from_wire(_label_wire(question.qname), 0)[0]
        except (dns.exception.DNSException, ValueError, UnicodeError):
            return _header_reply(data, dns.rcode.FORMERR)
        with self.lock:
            answer = self.zone.lookup(qname, int(question.qtype), now)
        _fill(reply, answer)
        wire = bytes(reply.pack())
        if len(wire) > limit:
            # RFC 2181 section 9: set TC and let the client retry over TCP;
            # a partial RRset would be worse than none.
            reply.rr, reply.auth = [], []
            reply.ar = [rr for rr in reply.ar if rr.rtype == _OPT]
            reply.header.tc = 1
            wire = bytes(reply.pack())
        return wire

    def _transfer(self, data: bytes, peer: Any) -> list[bytes]:
        """AXFR over TCP: signed with our key, or from loopback if allowed."""
        try:
            query = dns.message.from_wire(data, keyring=self.keyring)
        except dns.exception.DNSException:
            reply = _header_reply(data, dns.rcode.NOTAUTH)
            return [reply] if reply else []
        if not query.had_tsig:
            host = peer[0] if isinstance(peer, tuple) else ""
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not (self.allow_loopback_axfr and loopback):
                log.debug("axfr from %s refused: unsigned, not loopback", peer)
                reply = _header_reply(data, dns.rcode.REFUSED)
                return [reply] if reply else []
        question = query.question[0]
        if question.rdtype != _AXFR or question.name != self.zone.origin:
            response = dns.message.make_response(query)
            response.set_rcode(
                dns.rcode.NOTIMP if question.rdtype != _AXFR else dns.rcode.NOTAUTH
            )
            return [response.to_wire()]
        now = time.monotonic()
        with self.lock:
            if now >= self.zone.next_deadline:
                self.zone.expire(now)
            soa = self.zone.soa()
            rrsets: list[dns.rrset.RRset] = []
            for name, node in self.zone.nodes.items():
                for rdtype, records in node.items():
                    if name == self.zone.origin and rdtype == dns.rdatatype.SOA:
                        continue
                    rrset = dns.rrset.RRset(
                        records[0].name,
                        dns.rdataclass.IN,
                        dns.rdatatype.RdataType(rdtype),
                    )
                    for record in records:
                        rrset.add(record.rdata, record.ttl)
                    rrsets.append(rrset)
        soa_rrset = dns.rrset.from_rdata(soa.name, soa.ttl, soa.rdata)
        # RFC 5936 section 2.2: SOA first and last. Chunks keep each message
        # well under 64 KiB; TSIG runs over the sequence (RFC 8945 5.3.1).
        body = [soa_rrset, *rrsets, soa_rrset]
        replies: list[bytes] = []
        ctx: Any = None
        for start in range(0, len(body), 200):
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            response.answer = body[start : start + 200]
            replies.append(response.to_wire(multi=True, tsig_ctx=ctx))
            ctx = response.tsig_ctx
        log.debug("axfr to %s: %d rrsets", peer, len(body))
        return replies


def _fill(reply: dnslib.DNSRecord, answer: Answer) -> None:
    reply.header.rcode = answer.rcode
    for section, records in (
        (reply.add_answer, answer.answer),
        (reply.add_auth, answer.authority),
    ):
        for record in records:
            section(_to_dnslib(record))
    opt = [rr for rr in reply.ar if rr.rtype == _OPT]
    reply.ar = [_to_dnslib(r) for r in answer.additional] + opt
    reply.set_header_qa()


def _to_dnslib(record: Record) -> dnslib.RR:
    # Names in RDATA go out uncompressed: RFC 2782 forbids compressing the
    # SRV target, and for the other types it is optional.
    return dnslib.RR(
        rname=dnslib.DNSLabel(record.name.labels[:-1]),
        rtype=record.rdtype,
        rclass=dns.rdataclass.IN,
        ttl=record.ttl,
        rdata=dnslib.RD(record.rdata.to_wire()),
    )


def _label_wire(label: dnslib.DNSLabel) -> bytes:
    out = bytearray()
    for part in label.label:
        if len(part) > 63:
            raise ValueError("label too long")
        out.append(len(part))
        out += part
    out.append(0)
    return bytes(out)


def _header_reply(data: bytes, rcode: int) -> bytes | None:
    """A reply of just the header with ``rcode``; ``None`` if unreadable."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    flags = ((data[2] & 0x79) | 0x80) << 8 | (rcode & 0xF)
    return data[0:2] + struct.pack("!HHHHH", flags, 0, 0, 0, 0)
