"""``mesh dns`` as a real process: SIGKILL and restart, lease expiry, SIGTERM."""

from __future__ import annotations

import base64
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable

import dns.edns
import dns.message
import dns.query
import dns.rcode
import dns.update
import pytest

from mesh.keyfile import load_key
from mesh.responder.testing import DnsProcess, read_line

pytestmark = pytest.mark.slow


def register(proc: DnsProcess, owner: str, rdtype: str, text: str, lease: int) -> None:
    update = dns.update.UpdateMessage("mesh.internal.", keyring=load_key(proc.key_file))
    update.add(owner, 5, rdtype, text)
    option = dns.edns.GenericOption(dns.edns.OptionType(2), struct.pack("!I", lease))
    update.use_edns(0, options=[option])
    reply = dns.query.tcp(update, "127.0.0.1", port=proc.port, timeout=5)
    assert reply.rcode() == dns.rcode.NOERROR


def rcode(proc: DnsProcess, qname: str, rdtype: str = "SRV") -> int:
    query = dns.message.make_query(qname, rdtype)
    return dns.query.udp(query, "127.0.0.1", port=proc.port, timeout=5).rcode()


def test_sigkill_and_restart_keeps_registrations(
    dns_process: Callable[..., DnsProcess],
) -> None:
    first = dns_process()
    register(first, "_web._tcp", "SRV", "0 5 8080 host-a", lease=600)
    register(first, "host-a", "A", "127.0.0.5", lease=600)
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    second = dns_process(first.port)
    assert rcode(second, "_web._tcp.mesh.internal.") == dns.rcode.NOERROR
    assert rcode(second, "host-a.mesh.internal.", "A") == dns.rcode.NOERROR


def test_expired_lease_disappears(dns_process: Callable[..., DnsProcess]) -> None:
    proc = dns_process()
    register(proc, "_short._tcp", "SRV", "0 5 8080 host-a", lease=1)
    register(proc, "_long._tcp", "SRV", "0 5 8080 host-a", lease=600)
    deadline = time.monotonic() + 15
    while rcode(proc, "_short._tcp.mesh.internal.") == dns.rcode.NOERROR:
        assert time.monotonic() < deadline, "lease of 1 s never expired"
        time.sleep(0.2)
    assert rcode(proc, "_short._tcp.mesh.internal.") == dns.rcode.NXDOMAIN
    assert rcode(proc, "_long._tcp.mesh.internal.") == dns.rcode.NOERROR


def test_sigterm_stops_cleanly(dns_process: Callable[..., DnsProcess]) -> None:
    proc = dns_process()
    started = time.monotonic()
    assert proc.kill(signal.SIGTERM, timeout=10) == 0
    # Generous: the process polls its stop flag twice a second.
    assert time.monotonic() - started < 8


def test_generates_a_private_key_when_none_exists(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    state = tmp_path / "state"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh",
            "dns",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(proc, 20).startswith("listening 127.0.0.1:")
        key_file = state / "tsig.key"
        assert key_file.stat().st_mode & 0o077 == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    secret = key_file.read_text().split('secret "')[1].split('"')[0]
    assert str(key_file) in err
    assert secret not in err


def dig_axfr(proc: DnsProcess, *args: str) -> str:
    cmd = ["dig", "@127.0.0.1", "-p", str(proc.port), "+time=3", "+tries=1"]
    cmd += [*args, "mesh.internal.", "AXFR"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout


needs_dig = pytest.mark.skipif(shutil.which("dig") is None, reason="dig missing")


@needs_dig
def test_unsigned_axfr_from_loopback_allowed_by_default(
    dns_process: Callable[..., DnsProcess],
) -> None:
    proc = dns_process()
    register(proc, "host-a", "A", "127.0.0.5", lease=600)
    out = dig_axfr(proc)
    assert "host-a.mesh.internal." in out and "127.0.0.5" in out
    assert "Transfer failed" not in out


@needs_dig
@pytest.mark.parametrize(
    ("extra", "env"),
    [
        ((), {"MESH_AXFR_LOOPBACK": "false"}),
        (("--no-axfr-loopback",), {}),
    ],
    ids=["env", "flag"],
)
def test_axfr_must_be_signed_when_loopback_is_off(
    dns_process: Callable[..., DnsProcess],
    extra: tuple[str, ...],
    env: dict[str, str],
) -> None:
    proc = dns_process(0, *extra, env=env)
    register(proc, "host-a", "A", "127.0.0.5", lease=600)
    unsigned = dig_axfr(proc)
    assert "Transfer failed" in unsigned
    assert "127.0.0.5" not in unsigned
    # dig reads the key file as named does; the reply is signed with it too.
    signed = dig_axfr(proc, "-k", str(proc.key_file))
    assert "host-a.mesh.internal." in signed and "127.0.0.5" in signed
    assert "Transfer failed" not in signed
    key = load_key(proc.key_file)
    wrong = base64.b64encode(b"w" * 32).decode()
    forged = dig_axfr(proc, "-y", f"hmac-sha256:{key.name}:{wrong}")
    assert "127.0.0.5" not in forged


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the responder has closed ``sock``; False if it stays open."""
    sock.settimeout(timeout)
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _still_serving(proc: DnsProcess) -> None:
    register(proc, "host-probe", "A", "127.0.0.7", lease=600)
    query = dns.message.make_query("host-probe.mesh.internal.", "A")
    for send in (dns.query.udp, dns.query.tcp):
        reply = send(query, "127.0.0.1", port=proc.port, timeout=5)
        assert [rd.address for rd in reply.answer[0]] == ["127.0.0.7"]


def test_tcp_clients_over_the_cap_are_closed_and_others_served(
    dns_process: Callable[..., DnsProcess],
) -> None:
    cap, extra = 4, 6
    # A long idle time, so only the cap closes anything here.
    proc = dns_process(0, "--max-tcp", str(cap), "--tcp-idle", "60")
    crowd = []
    for _ in range(cap + extra):
        crowd.append(socket.create_connection(("127.0.0.1", proc.port), timeout=5))
        # One at a time, so the responder sees them in this order and the
        # longest idle is always the earliest.
        time.sleep(0.05)
    try:
        # The earliest `extra` made room for the later ones.
        assert all(_closed_by_peer(s, 5.0) for s in crowd[:extra])
        assert not any(_closed_by_peer(s, 0.2) for s in crowd[extra:])
        _still_serving(proc)
    finally:
        for sock in crowd:
            sock.close()


def test_idle_tcp_clients_are_closed_and_others_served(
    dns_process: Callable[..., DnsProcess],
) -> None:
    proc = dns_process(0, env={"MESH_DNS_TCP_IDLE": "0.5"})
    address = ("127.0.0.1", proc.port)
    idle = [socket.create_connection(address, timeout=5) for _ in range(5)]
    partial = socket.create_connection(address, timeout=5)
    partial.sendall(b"\x00\x40" + b"\x00" * 10)  # announces 64 bytes, sends 10
    busy = socket.create_connection(address, timeout=5)
    query = dns.message.make_query("mesh.internal.", "SOA")
    waiting = {*idle, partial}
    try:
        start = time.monotonic()
        # Busy asks every 0.2 s, so it is never idle for 0.5 s and stays
        # open. The others must be closed well before the 3 s default idle
        # time would close them, which shows the setting took effect.
        while time.monotonic() - start < 2.5:
            dns.query.send_tcp(busy, query, time.time() + 5)
            reply, _ = dns.query.receive_tcp(busy, time.time() + 5)
            assert reply.rcode() == dns.rcode.NOERROR
            waiting = {s for s in waiting if not _closed_by_peer(s, 0.01)}
            time.sleep(0.2)
        assert not waiting, f"{len(waiting)} idle clients still open after 2.5 s"
        _still_serving(proc)
    finally:
        for sock in (*idle, partial, busy):
            sock.close()
