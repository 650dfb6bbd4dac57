"""Random and mutated DNS messages against a running responder (issue 6).

Each hypothesis example is a batch of messages, sent over UDP and TCP: plain
queries, UPDATEs (unsigned, signed with a wrong key, correctly signed) and
random bytes, most of them bit-flipped, truncated or extended. After each
batch a valid SRV query must still be answered over UDP and TCP, and the
zone must equal what the correctly signed, unmutated updates of all batches
so far made of it: nothing else may change it.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.tsig
import dns.update
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.responder.testing import RunningResponder, start_responder

pytestmark = pytest.mark.slow

ZONE = "mesh.internal."
WRONG = dns.tsig.Key("srvmesh-key.", b"w" * 32, dns.tsig.HMAC_SHA256)
LABELS = ["_svc._tcp", "host-a", "HOST-B", "a.b.c", "@", "x" * 63]
TYPES = ["A", "AAAA", "SRV", "TXT", "SOA", "NS", "ANY", "AXFR", "CNAME", "MX"]
RDATA = {
    "A": "127.0.0.9",
    "AAAA": "::9",
    "SRV": "0 1 9 host-a",
    "TXT": '"fuzz"',
    "NS": "ns",
    "MX": "1 host-a",
    "CNAME": "host-a",
}

mutations = st.one_of(
    st.just(("none", 0, b"")),
    st.tuples(st.just("flip"), st.integers(0, 4096), st.binary(max_size=0)),
    st.tuples(st.just("truncate"), st.integers(0, 4096), st.binary(max_size=0)),
    st.tuples(st.just("extend"), st.just(0), st.binary(min_size=1, max_size=64)),
)

queries = st.tuples(
    st.just("query"),
    st.sampled_from(LABELS),
    st.sampled_from(TYPES),
    st.booleans(),  # EDNS
)
updates = st.tuples(
    st.just("update"),
    st.sampled_from(["unsigned", "wrong key", "signed"]),
    st.lists(
        st.tuples(
            st.sampled_from(["add", "delete"]),
            st.sampled_from(LABELS),
            st.sampled_from(sorted(RDATA)),
        ),
        min_size=1,
        max_size=4,
    ),
)
garbage = st.tuples(st.just("bytes"), st.binary(max_size=600))

messages = st.tuples(
    st.one_of(queries, updates, garbage),
    st.lists(mutations, max_size=3),
    st.sampled_from(["udp", "tcp"]),
)


def mutate(wire: bytes, mutation: tuple[str, int, bytes]) -> bytes:
    kind, where, extra = mutation
    if kind == "flip" and wire:
        # Never the ID (bytes 0-1): TSIG signs the original ID, which it
        # carries itself, so a signed update with another ID is still valid.
        pos = 2 + where % max(1, len(wire) - 2) if len(wire) > 2 else 0
        pos = min(pos, len(wire) - 1)
        return wire[:pos] + bytes([wire[pos] ^ (1 << (where % 8))]) + wire[pos + 1 :]
    if kind == "truncate":
        return wire[: where % (len(wire) + 1)]
    if kind == "extend":
        return wire + extra
    return wire


def zone_state(running: RunningResponder) -> set[tuple[str, int, str]]:
    """Every record but the SOA (whose serial counts changes, not content)."""
    return {
        (r.name.to_text().lower(), r.rdtype, r.rdata.to_text().lower())
        for r, _ in running.responder.records()
        if r.rdtype != dns.rdatatype.SOA
    }


def apply(
    state: set[tuple[str, int, str]], changes: list[tuple[str, str, str]]
) -> set[tuple[str, int, str]]:
    """What an accepted update must make of ``state`` (RFC 2136 3.4.2)."""
    origin = dns.name.from_text(ZONE)
    state = set(state)
    for op, label, rdtype in changes:
        name = dns.name.from_text(label, origin).to_text().lower()
        kind = int(dns.rdatatype.from_text(rdtype))
        if op == "add":
            rdata = dns.rdata.from_text(
                "IN", rdtype, RDATA[rdtype], origin, relativize=False
            )
            state.add((name, kind, rdata.to_text().lower()))
        elif not (name == ZONE and kind in (dns.rdatatype.SOA, dns.rdatatype.NS)):
            # The apex SOA and NS are never deleted (3.4.2.3).
            state = {r for r in state if r[:2] != (name, kind)}
    return state


def send_raw(
    running: RunningResponder, wire: bytes, transport: str, wait: float
) -> bytes | None:
    """Send ``wire``; the reply if one came within ``wait`` seconds."""
    address = (running.host, running.port)
    try:
        if transport == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(wait)
                sock.sendto(wire, address)
                return sock.recv(65535)
        with socket.create_connection(address, timeout=2) as sock:
            sock.sendall(struct.pack("!H", len(wire) & 0xFFFF) + wire)
            sock.settimeout(wait)
            return sock.recv(65535)[2:]
    except (TimeoutError, ConnectionResetError):
        # No reply is a valid outcome: malformed messages may be dropped.
        return None


def probe(running: RunningResponder) -> None:
    query = dns.message.make_query("_probe._tcp." + ZONE, "SRV")
    for send in (dns.query.udp, dns.query.tcp):
        reply = send(query, running.host, port=running.port, timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR
        assert [rd.port for rd in reply.answer[0]] == [7]


def test_random_and_mutated_messages_change_nothing_unsigned(tmp_path: Path) -> None:
    # Leases far longer than the run, so no record expires under the model.
    running = start_responder(tmp_path, tcp_timeout=1.0, default_lease=3600)
    counts = {"messages": 0, "applied": 0, "checks": 0}
    try:
        signed_probe = dns.update.UpdateMessage(ZONE, keyring=running.key)
        signed_probe.add("_probe._tcp", 5, "SRV", "0 1 7 host-probe")
        dns.query.tcp(signed_probe, running.host, port=running.port, timeout=5)
        expected = zone_state(running)

        @settings(
            max_examples=600,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(st.lists(messages, min_size=1, max_size=12))
        def batch(items: list[tuple[Any, ...]]) -> None:
            nonlocal expected
            for message, mutation_list, transport in items:
                counts["messages"] += 1
                if message[0] == "bytes":
                    wire = message[1]
                elif message[0] == "query":
                    _, label, rdtype, edns = message
                    query = dns.message.make_query(
                        dns.name.from_text(label, dns.name.from_text(ZONE)),
                        rdtype,
                        use_edns=0 if edns else None,
                    )
                    wire = query.to_wire()
                else:
                    _, signing, changes = message
                    key = {"unsigned": None, "wrong key": WRONG}.get(
                        signing, running.key
                    )
                    update = dns.update.UpdateMessage(ZONE, keyring=key)
                    for op, label, rdtype in changes:
                        if op == "add":
                            update.add(label, 5, rdtype, RDATA[rdtype])
                        else:
                            update.delete(label, rdtype)
                    wire = update.to_wire()
                for mutation in mutation_list:
                    wire = mutate(wire, mutation)
                signed = message[0] == "update" and message[1] == "signed"
                # Signed updates wait for their reply: it says whether the
                # update was accepted. A mutation can leave the signature
                # valid (the key name's case is not signed, RFC 8945 4.3.3).
                reply = send_raw(running, wire, transport, 0.5 if signed else 0.02)
                if (
                    signed
                    and reply is not None
                    and len(reply) >= 12
                    and reply[0:2] == wire[0:2]
                    and (reply[2] >> 3) & 0xF == 5
                    and reply[3] & 0xF == dns.rcode.NOERROR
                ):
                    counts["applied"] += 1
                    expected = apply(expected, message[2])
            probe(running)
            counts["checks"] += 1
            assert zone_state(running) == expected

        batch()
    finally:
        running.responder.stop()
    print(
        f"dns fuzz: {counts['messages']} messages, {counts['applied']} signed "
        f"updates applied, zone checks {counts['checks']}"
    )
