"""The responder over real sockets, asked by dig, nsupdate and dnspython."""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.update
import dns.xfr
import dns.zone
import pytest

from mesh.keyfile import generate_key_file
from mesh.responder.testing import RunningResponder, start_responder

needs_dig = pytest.mark.skipif(shutil.which("dig") is None, reason="dig missing")
needs_nsupdate = pytest.mark.skipif(
    shutil.which("nsupdate") is None, reason="nsupdate missing"
)


def register(r: RunningResponder, *records: tuple[str, str, str], lease: int = 60):
    update = dns.update.UpdateMessage(r.zone, keyring=r.key)
    for owner, rdtype, text in records:
        update.add(owner, 5, rdtype, text)
    option = dns.edns.GenericOption(dns.edns.OptionType(2), struct.pack("!I", lease))
    update.use_edns(0, payload=65535, options=[option])
    reply = dns.query.tcp(update, r.host, port=r.port, timeout=5)
    assert reply.rcode() == dns.rcode.NOERROR


def ask(r: RunningResponder, qname: str, rdtype: str = "SRV") -> dns.message.Message:
    query = dns.message.make_query(qname, rdtype)
    return dns.query.udp(query, r.host, port=r.port, timeout=5)


def dig(r: RunningResponder, *args: str) -> str:
    cmd = ["dig", f"@{r.host}", "-p", str(r.port), "+time=3", "+tries=2", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    # One space between fields, so assertions do not depend on dig's tabs.
    return "\n".join(" ".join(line.split()) for line in out.splitlines())


@needs_dig
def test_dig_sees_srv_with_glue(responder: RunningResponder) -> None:
    register(
        responder,
        ("_web._tcp", "SRV", "0 5 8080 host-a"),
        ("host-a", "A", "127.0.0.5"),
        ("host-a", "AAAA", "::5"),
    )
    out = dig(responder, "_WEB._tcp.mesh.internal.", "SRV")
    assert "status: NOERROR" in out and " aa" in out
    assert (
        "_web._tcp.mesh.internal. 5 in srv 0 5 8080 host-a.mesh.internal."
        in out.lower()
    )
    additional = out.split("ADDITIONAL SECTION:")[1]
    assert "127.0.0.5" in additional and "::5" in additional


@needs_dig
def test_dig_negative_answers_and_refused(responder: RunningResponder) -> None:
    register(responder, ("host-a", "A", "127.0.0.5"))
    nx = dig(responder, "nothing.mesh.internal.", "SRV")
    assert "status: NXDOMAIN" in nx
    assert "AUTHORITY SECTION:\nmesh.internal. 5 IN SOA" in nx
    nodata = dig(responder, "host-a.mesh.internal.", "SRV")
    assert "status: NOERROR" in nodata and "ANSWER: 0" in nodata
    assert "IN SOA" in nodata
    refused = dig(responder, "example.com.", "A")
    assert "status: REFUSED" in refused


@needs_dig
def test_big_rrset_truncates_over_udp_and_comes_whole_over_tcp(
    responder: RunningResponder,
) -> None:
    register(
        responder,
        *[("_big._tcp", "SRV", f"0 1 {9000 + i} host-{i:03d}") for i in range(60)],
    )
    truncated = dig(responder, "+ignore", "+noedns", "_big._tcp.mesh.internal.", "SRV")
    assert " tc" in truncated.split("flags:")[1].split(";")[0]
    retried = dig(responder, "+noedns", "_big._tcp.mesh.internal.", "SRV")
    assert "ANSWER: 60" in retried
    over_tcp = dig(responder, "+tcp", "_big._tcp.mesh.internal.", "SRV")
    assert "ANSWER: 60" in over_tcp


def test_edns_size_decides_truncation(responder: RunningResponder) -> None:
    register(
        responder,
        *[("_mid._tcp", "SRV", f"0 1 {9000 + i} h-{i:02d}") for i in range(20)],
    )
    small = dns.message.make_query("_mid._tcp.mesh.internal.", "SRV")
    big = dns.message.make_query("_mid._tcp.mesh.internal.", "SRV", payload=4096)
    host, port = responder.host, responder.port
    reply = dns.query.udp(small, host, port=port, timeout=5)
    assert reply.flags & dns.flags.TC
    reply = dns.query.udp(big, host, port=port, timeout=5)
    assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == 20


@needs_nsupdate
def test_nsupdate_adds_and_deletes(responder: RunningResponder) -> None:
    script = (
        f"server {responder.host} {responder.port}\n"
        "zone mesh.internal.\n"
        "update add _cli._tcp.mesh.internal. 5 SRV 0 0 7000 host-n.mesh.internal.\n"
        "update add host-n.mesh.internal. 5 A 127.0.0.8\n"
        "send\n"
    )
    nsupdate = ["nsupdate", "-k", str(responder.key_file)]
    done = subprocess.run(
        nsupdate, input=script, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert ask(responder, "_cli._tcp.mesh.internal.").answer
    script = (
        f"server {responder.host} {responder.port}\n"
        "zone mesh.internal.\n"
        "prereq yxrrset _cli._tcp.mesh.internal. SRV\n"
        "update delete _cli._tcp.mesh.internal. SRV\n"
        "send\n"
    )
    done = subprocess.run(
        nsupdate, input=script, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert ask(responder, "_cli._tcp.mesh.internal.").rcode() == dns.rcode.NXDOMAIN


@needs_nsupdate
def test_nsupdate_with_wrong_key_is_refused(
    responder: RunningResponder, tmp_path: Path
) -> None:
    wrong = generate_key_file(tmp_path / "wrong.key")
    script = (
        f"server {responder.host} {responder.port}\n"
        "zone mesh.internal.\n"
        "update add host-w.mesh.internal. 5 A 127.0.0.9\n"
        "send\n"
    )
    done = subprocess.run(
        ["nsupdate", "-k", str(wrong)],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert ask(responder, "host-w.mesh.internal.", "A").rcode() == dns.rcode.NXDOMAIN
    assert responder.responder.zone.dynamic_records() == []


def test_axfr_from_loopback_and_signed(responder: RunningResponder) -> None:
    register(
        responder, ("_web._tcp", "SRV", "0 5 8080 host-a"), ("host-a", "A", "127.0.0.5")
    )
    for keyring in (None, responder.key):
        zone = dns.zone.Zone("mesh.internal.")
        query, _ = dns.xfr.make_query(zone, keyring=keyring)
        dns.query.inbound_xfr(
            responder.host, zone, query, port=responder.port, timeout=5
        )
        assert zone.get_rdataset("_web._tcp", "SRV") is not None
        assert zone.get_rdataset("@", "SOA") is not None


def test_axfr_refused_when_loopback_not_allowed(tmp_path: Path) -> None:
    running = start_responder(tmp_path, allow_loopback_axfr=False)
    try:
        zone = dns.zone.Zone("mesh.internal.")
        query, _ = dns.xfr.make_query(zone)
        with pytest.raises(dns.xfr.TransferError):
            dns.query.inbound_xfr(
                running.host, zone, query, port=running.port, timeout=5
            )
        query, _ = dns.xfr.make_query(zone, keyring=running.key)
        dns.query.inbound_xfr(running.host, zone, query, port=running.port, timeout=5)
    finally:
        running.responder.stop()


def test_question_case_is_echoed(responder: RunningResponder) -> None:
    register(
        responder, ("_Svc._TCP", "SRV", "0 0 1 Host-A"), ("host-a", "A", "127.0.0.5")
    )
    for asked in (
        "_svc._tcp.mesh.internal.",
        "_SVC._TCP.MESH.INTERNAL.",
        "_sVc._tCp.MeSh.InTeRnAl.",
    ):
        # Twice plain (the second from the pre-encoded cache), and once with
        # an EDNS option, which takes the parsing path.
        cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"12345678")
        for options in (None, None, [cookie]):
            query = dns.message.make_query(asked, "SRV", use_edns=0, options=options)
            wire = dns.query.udp(query, responder.host, port=responder.port, timeout=5)
            assert wire.question[0].name.to_text() == asked
            assert wire.answer and wire.additional


def test_cache_is_dropped_on_update(responder: RunningResponder) -> None:
    register(responder, ("host-a", "A", "127.0.0.5"))
    assert ask(responder, "host-a.mesh.internal.", "A").answer
    update = dns.update.UpdateMessage(responder.zone, keyring=responder.key)
    update.replace("host-a", 5, "A", "127.0.0.6")
    dns.query.tcp(update, responder.host, port=responder.port, timeout=5)
    reply = ask(responder, "host-a.mesh.internal.", "A")
    assert [r.address for r in reply.answer[0]] == ["127.0.0.6"]


# ---- bad input (C16) --------------------------------------------------------


def _valid_probe(r: RunningResponder) -> None:
    reply = ask(r, "_web._tcp.mesh.internal.")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer


def _bad_packets(rng: random.Random) -> list[bytes]:
    valid = dns.message.make_query(
        "_web._tcp.mesh.internal.", "SRV", use_edns=0
    ).to_wire()
    fixed = [
        b"",
        b"\x00",
        b"\x00" * 11,
        rng.randbytes(512),
        b"\x12\x34\x00\x00\xff\xff\x00\x00\x00\x00\x00\x00",  # 65535 questions
        b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x21\x00\x01",
        b"\x09\x20" + valid[2:],  # whitespace bytes in the ID
        valid[:-3],
        valid + b"\x00" * 7,
        valid[:4] + b"\x00\x01\x00\x05" + valid[8:],
    ]
    packets = list(fixed)
    for _ in range(160):
        packets.append(rng.randbytes(rng.randrange(0, 300)))
    for _ in range(200):
        mutated = bytearray(valid)
        for _ in range(rng.randrange(1, 6)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.3:
            mutated = mutated[: rng.randrange(len(mutated))]
        packets.append(bytes(mutated))
    return packets


@pytest.mark.slow
def test_random_and_mutated_udp_packets(responder: RunningResponder) -> None:
    register(responder, ("_web._tcp", "SRV", "0 5 8080 host-a"))
    rng = random.Random(20240611)
    packets = _bad_packets(rng)
    assert len(packets) > 300
    replies = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for start in range(0, len(packets), 50):
            for packet in packets[start : start + 50]:
                sock.sendto(packet, (responder.host, responder.port))
            sock.settimeout(0.5)
            while True:
                try:
                    reply = sock.recv(65535)
                except TimeoutError:
                    break
                # Whatever comes back is a well-formed DNS reply.
                assert dns.message.from_wire(reply).flags & dns.flags.QR
                replies += 1
            _valid_probe(responder)
    # Most mutated queries keep a readable header and get an answer.
    assert replies > 100
    _valid_probe(responder)


def test_random_and_mutated_tcp_messages(responder: RunningResponder) -> None:
    register(responder, ("_web._tcp", "SRV", "0 5 8080 host-a"))
    rng = random.Random(7)
    for packet in _bad_packets(rng)[:120]:
        with socket.create_connection(
            (responder.host, responder.port), timeout=5
        ) as sock:
            sock.sendall(struct.pack("!H", len(packet)) + packet)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65535):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    # Several messages on one connection, then a valid query on it.
    query = dns.message.make_query("_web._tcp.mesh.internal.", "SRV")
    with socket.create_connection((responder.host, responder.port), timeout=5) as sock:
        for _ in range(3):
            dns.query.send_tcp(sock, query)
            reply, _ = dns.query.receive_tcp(sock, time.time() + 5)
            assert reply.answer
    _valid_probe(responder)


def _closed_by_peer(sock: socket.socket) -> bool:
    # A server closing a socket with unread input sends RST instead of FIN.
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


@pytest.mark.slow
def test_idle_and_partial_tcp_clients_are_closed(tmp_path: Path) -> None:
    running = start_responder(tmp_path, tcp_timeout=1.0, max_tcp_connections=64)
    try:
        register(running, ("_web._tcp", "SRV", "0 5 8080 host-a"))
        addr = (running.host, running.port)
        fds_before = len(os.listdir("/proc/self/fd"))
        idle = socket.create_connection(addr, timeout=10)
        one_byte = socket.create_connection(addr, timeout=10)
        one_byte.sendall(b"\x00")
        partial = socket.create_connection(addr, timeout=10)
        partial.sendall(b"\x00\x64" + b"\x00" * 10)
        oversized = socket.create_connection(addr, timeout=10)
        oversized.sendall(b"\xff\xff" + b"\x00" * 100)
        crowd = [socket.create_connection(addr, timeout=10) for _ in range(500)]
        # The cap closed the oldest, and a new client is still served.
        query = dns.message.make_query("_web._tcp.mesh.internal.", "SRV")
        assert dns.query.tcp(query, running.host, port=running.port, timeout=5).answer
        for sock in (idle, one_byte, partial, oversized):
            assert _closed_by_peer(sock)
        deadline = time.monotonic() + 20
        while running.responder.tcp_connections and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running.responder.tcp_connections == 0
        for sock in (idle, one_byte, partial, oversized, *crowd):
            sock.close()
        _valid_probe(running)
        # Every server-side socket was closed too, not just forgotten (C16).
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 4
    finally:
        running.responder.stop()


def test_wall_clock_step_does_not_end_leases(
    responder: RunningResponder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # C24: leases run on the monotonic clock, so a one-hour step of the wall
    # clock neither expires a 60 s lease nor stretches it.
    register(responder, ("host-a", "A", "127.0.0.5"), lease=60)
    real = time.time
    for step in (3600, -3600):
        monkeypatch.setattr(time, "time", lambda step=step: real() + step)
        assert ask(responder, "host-a.mesh.internal.", "A").answer
    ((record, remaining),) = [
        (r, left) for r, left in responder.responder.records() if not r.static
    ]
    assert remaining is not None and 0 < remaining <= 60


def test_lease_still_ends_on_time_after_a_wall_clock_step_back(
    responder: RunningResponder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other half of C24: a wall clock stepped back an hour must not keep
    # a record alive for that hour.
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    register(responder, ("host-b", "A", "127.0.0.6"), lease=1)
    assert ask(responder, "host-b.mesh.internal.", "A").answer
    deadline = time.monotonic() + 15
    while ask(responder, "host-b.mesh.internal.", "A").answer:
        assert time.monotonic() < deadline, "a 1 s lease outlived a clock step"
        time.sleep(0.2)
