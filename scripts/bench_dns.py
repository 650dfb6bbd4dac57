"""SRV queries per second: our responder vs a stock dnslib server vs BIND.

All three serve the same zone on loopback, each in its own process, and each
is measured by the same dnsperf run in turn. The numbers mean little alone on
a shared 2-core machine; the ratio ours/BIND from one run is what we track
(goal: at least 0.5).

Usage: scripts/bench_dns.py [seconds per server, default 10]
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

ROOT = Path(__file__).resolve().parents[1]
ZONE = "mesh.internal."
QNAME = "_web._tcp.mesh.internal."

ZONE_TEXT = """\
$ORIGIN mesh.internal.
$TTL 5
@       IN SOA ns.mesh.internal. hostmaster.mesh.internal. 1 3600 600 86400 5
@       IN NS  ns
ns      IN A   127.0.0.1
_web._tcp IN SRV 0 10 8080 host-a
_web._tcp IN SRV 0 10 8081 host-b
_web._tcp IN SRV 1 0  8082 host-c
host-a  IN A   127.0.0.11
host-b  IN A   127.0.0.12
host-c  IN A   127.0.0.13
host-c  IN AAAA ::13
"""

# A stock dnslib server: its own ZoneResolver and threaded DNSServer, as a
# user of dnslib would write it.
DNSLIB_SERVER = """
import sys, time
from dnslib.server import DNSServer
from dnslib.zoneresolver import ZoneResolver
zone = open(sys.argv[1]).read()
server = DNSServer(ZoneResolver(zone, glob=False), port=int(sys.argv[2]),
                   address="127.0.0.1")
server.start_thread()
while True:
    time.sleep(1)
"""


def free_port() -> int:
    # The port must be free for both UDP and TCP.
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def wait_ready(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    query = dns.message.make_query(QNAME, "SRV")
    while time.monotonic() < deadline:
        try:
            reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
            if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                return
        except (dns.exception.Timeout, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} never answered {QNAME}")


def dnsperf(port: int, seconds: float, query_file: Path) -> float:
    out = subprocess.run(
        [
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            str(port),
            "-d",
            str(query_file),
            "-l",
            str(seconds),
            "-t",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    match = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    if match is None:
        raise RuntimeError(f"dnsperf printed no rate:\n{out}")
    codes = re.search(r"Response codes:\s+(.*)", out)
    # dnsperf prints e.g. "NOERROR 690875 (100.00%)" when every answer was good.
    if codes is None or not re.fullmatch(r"NOERROR \d+ \(100\.00%\)", codes.group(1)):
        print(f"  (response codes: {codes.group(1) if codes else 'none'})")
    if lost and int(lost.group(1)):
        print(f"  (dnsperf lost {lost.group(1)} queries)")
    return float(match.group(1))


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def bench(name: str, cmd: list[str], port: int, seconds: float, qfile: Path) -> float:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port)
        qps = dnsperf(port, seconds, qfile)
    finally:
        stop(proc)
    print(f"{name:<22} {qps:>10.0f} SRV qps")
    return qps


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    if shutil.which("dnsperf") is None:
        print("dnsperf is not installed (apt-get install dnsperf)")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp_name:
        tmp = Path(tmp_name)
        zone_file = tmp / "mesh.internal.zone"
        zone_file.write_text(ZONE_TEXT)
        qfile = tmp / "queries"
        qfile.write_text(f"{QNAME} SRV\n")
        results: dict[str, float] = {}

        port = free_port()
        results["srvmesh responder"] = bench(
            "srvmesh responder",
            [
                sys.executable,
                "-m",
                "mesh",
                "dns",
                "--listen",
                f"127.0.0.1:{port}",
                "--zone-file",
                str(zone_file),
                "--state-dir",
                str(tmp / "state"),
            ],
            port,
            seconds,
            qfile,
        )

        port = free_port()
        results["dnslib DNSServer"] = bench(
            "dnslib DNSServer",
            [sys.executable, "-c", DNSLIB_SERVER, str(zone_file), str(port)],
            port,
            seconds,
            qfile,
        )

        named = shutil.which("named") or (
            "/usr/sbin/named" if os.path.exists("/usr/sbin/named") else None
        )
        if named is None:
            print("BIND named is not installed; no ratio against BIND")
            return 0
        port = free_port()
        conf = tmp / "named.conf"
        conf.write_text(
            f"""
options {{
    directory "{tmp}";
    pid-file "{tmp}/named.pid";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
}};
zone "{ZONE}" {{ type primary; file "{zone_file}"; }};
"""
        )
        results["BIND named"] = bench(
            "BIND named",
            [named, "-g", "-c", str(conf), "-n", "2"],
            port,
            seconds,
            qfile,
        )
        ours, bind = results["srvmesh responder"], results["BIND named"]
        print(f"ratio srvmesh/BIND      {ours / bind:10.2f}  (goal >= 0.50)")
        print(f"ratio srvmesh/dnslib    {ours / results['dnslib DNSServer']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
