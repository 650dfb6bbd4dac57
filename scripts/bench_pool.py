"""Pool broadcast against raw pyzmq fan-out, then detection and failover times.

One run starts the bundled responder (``mesh dns``) and a pool of 3 hosts x
4 members on 127.0.0.2-4, each member its own process, finding the other
hosts' masters through DNS (the deployment path). This process joins host
127.0.0.2 as one more member, not eligible for master, and issues every
broadcast with ``include_self=False``, so each one goes to the 12 member
processes.

Beside the pool, in the same run, runs the baseline: 12 raw pyzmq member
processes on the same addresses and 3 forwarding processes, one per host,
wired the way a broadcast travels (issuer -> forwarder of its host -> local
members and the other two forwarders -> their members, replies back the same
way), with no tracking and no liveness: the issuer just counts 12 replies.
The same raw members also take requests straight from the issuer (flat
fan-out, no forwarders), printed for reference only. Blocks of each are
interleaved so a change in the machine's load hits all of them alike.

Then, with the configured heartbeat settings printed beside each figure:
a member SIGKILLed (and one SIGSTOPped) mid-handler until the issuer has it
failed; a master SIGKILLed until its host has a new master and until a
broadcast reaches every member again; a master SIGSTOPped until the members
have killed it by quorum and replaced it.

Goals (issue 4): a tracked broadcast at most 1.5x the forwarding baseline;
after a master crash, broadcasts complete again within 2 heartbeat intervals
of the crash being detected (a new master recorded); a hung master replaced
within 3 s. The member detection bounds are the ones mesh.pool.member
documents. Every process started here is killed on the way out.

Usage: scripts/bench_pool.py [--keep-logs]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.config import Settings  # noqa: E402
from mesh.errors import MeshError  # noqa: E402
from mesh.pool.election import MasterRecord  # noqa: E402
from mesh.pool.member import PoolMember, demo_handler  # noqa: E402
from mesh.pool.tracker import BroadcastResult, Outcome  # noqa: E402
from mesh.responder.testing import DnsProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POOL = "bench"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
PER_HOST = 4
MEMBERS = PER_HOST * len(HOSTS)
ISSUER_HOST = HOSTS[0]
PAYLOAD = b"x" * 64
# Per-broadcast budget while measuring: far above any healthy round trip.
BROADCAST_TIMEOUT = 5.0
# Failover probes: one broadcast every PROBE_SPACING s, each with this budget;
# "broadcast complete" times are the start of the first probe that reached
# every member, so they are accurate to PROBE_SPACING.
PROBE_SPACING = 0.025
PROBE_TIMEOUT = 1.5

# A pool member as a server embeds it: the demo handler, except that
# ``hold:<pid>`` keeps that one member busy (sending WORKING) for a minute
# while every other member answers at once, so a broadcast ends exactly when
# the issuer settles the held member.
POOL_MEMBER = """
import argparse, logging, os, signal, threading, time
from mesh.cli import add_settings_arguments, settings_from_args
from mesh.pool.member import (
    PoolMember, add_member_arguments, demo_handler, directory_from_args,
    settings_overrides,
)
parser = argparse.ArgumentParser()
add_member_arguments(parser)
add_settings_arguments(parser)
args = parser.parse_args()
logging.basicConfig(
    level=logging.INFO,
    format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
)
echo = demo_handler(args.host)
hold = b"hold:%d" % os.getpid()
def handle(payload):
    if payload == hold:
        time.sleep(60)
    return echo(payload)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
settings = settings_from_args(args, **settings_overrides(args))
member = PoolMember(args.pool, settings, handle, args.host,
                    directory=directory_from_args(args))
member.start()
try:
    while not stop.wait(0.5):
        pass
finally:
    member.close()
"""

# Baseline forwarder: requests from upstream go to every member that said
# HELLO and to every downstream forwarder; every reply goes to the one
# upstream peer. No ids kept, no liveness, nothing tracked.
RAW_FORWARDER = """
import sys, zmq
host, downstream = sys.argv[1], sys.argv[2:]
ctx = zmq.Context()
up = ctx.socket(zmq.ROUTER)
members = ctx.socket(zmq.ROUTER)
up_port = up.bind_to_random_port("tcp://" + host)
member_port = members.bind_to_random_port("tcp://" + host)
dealers = []
for endpoint in downstream:
    d = ctx.socket(zmq.DEALER)
    d.connect(endpoint)
    dealers.append(d)
print("tcp://%s:%d tcp://%s:%d" % (host, up_port, host, member_port), flush=True)
poller = zmq.Poller()
for s in [up, members, *dealers]:
    poller.register(s, zmq.POLLIN)
known, upstream = [], None
while True:
    for sock, _ in poller.poll():
        frames = sock.recv_multipart()
        if sock is up:
            upstream, bid, payload = frames
            for m in known:
                members.send_multipart([m, bid, payload])
            for d in dealers:
                d.send_multipart([bid, payload])
        elif sock is members:
            if frames[1] == b"HELLO":
                known.append(frames[0])
            else:
                up.send_multipart([upstream, frames[1], frames[0], frames[2]])
        else:
            up.send_multipart([upstream, *frames])
"""

# Baseline member: the demo handler's reply, on whichever socket asked.
RAW_MEMBER = """
import os, sys, zmq
host, forwarder, flat = sys.argv[1:]
prefix = ("%s/%d:" % (host, os.getpid())).encode()
ctx = zmq.Context()
poller = zmq.Poller()
for endpoint in (forwarder, flat):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, ("%s-%d" % (host, os.getpid())).encode())
    s.connect(endpoint)
    s.send(b"HELLO")
    poller.register(s, zmq.POLLIN)
while True:
    for sock, _ in poller.poll():
        bid, payload = sock.recv_multipart()
        sock.send_multipart([bid, prefix + payload])
"""


class Processes:
    """Every child this bench starts; all of them are killed in :meth:`close`."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.by_host: dict[str, list[subprocess.Popen[bytes]]] = {h: [] for h in HOSTS}

    def start(
        self, name: str, argv: list[str], pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdout=subprocess.PIPE if pipe else log,
                stderr=log,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            kill(proc)


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
            # A stopped process dies of SIGKILL too, but only once continued.
            os.kill(proc.pid, signal.SIGCONT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


def first_line(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode() if ready else ""
    if not line:
        raise RuntimeError(f"process {proc.args!r} did not start")
    return line.strip()


# -- the pool ------------------------------------------------------------------


class Pool:
    def __init__(self, procs: Processes, root: Path, dns: DnsProcess) -> None:
        self.procs = procs
        self.root = root
        self.dns_args = [
            "--nameservers",
            dns.address,
            "--key-file",
            str(dns.key_file),
            "--zone",
            "mesh.internal.",
        ]
        self.settings = Settings.load(
            None,
            runtime_dir=self.runtime_dir(ISSUER_HOST),
            nameservers=[dns.address],
            key_file=dns.key_file,
            zone="mesh.internal.",
        )
        self.members: dict[str, list[subprocess.Popen[bytes]]] = {h: [] for h in HOSTS}
        self.issuer: PoolMember | None = None
        self._spawned = 0

    def runtime_dir(self, host: str) -> Path:
        return self.root / f"run-{host}"

    def spawn(self, host: str) -> None:
        self._spawned += 1
        proc = self.procs.start(
            f"member-{host}-{self._spawned}",
            [
                sys.executable,
                "-c",
                POOL_MEMBER,
                "--pool",
                POOL,
                "--host",
                host,
                "--runtime-dir",
                str(self.runtime_dir(host)),
                "--heartbeat-interval",
                str(self.settings.heartbeat_interval),
                "--heartbeat-liveness",
                str(self.settings.heartbeat_liveness),
                *self.dns_args,
            ],
        )
        self.members[host].append(proc)

    def start(self) -> None:
        for host in HOSTS:
            for _ in range(PER_HOST):
                self.spawn(host)
        self.issuer = PoolMember(
            POOL,
            self.settings,
            demo_handler(ISSUER_HOST),
            ISSUER_HOST,
            eligible=False,
        )
        self.issuer.start()

    def live(self, host: str) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.members[host] if p.poll() is None]

    def heal(self) -> None:
        for host in HOSTS:
            for _ in range(PER_HOST - len(self.live(host))):
                self.spawn(host)

    def record(self, host: str) -> MasterRecord | None:
        path = self.runtime_dir(host) / f"{POOL}.master"
        try:
            return MasterRecord.from_json(path.read_text())
        except (OSError, ValueError, KeyError):
            return None

    def master(self, host: str) -> subprocess.Popen[bytes]:
        record = self.record(host)
        assert record is not None
        return next(p for p in self.live(host) if p.pid == record.pid)

    def follower(self, host: str) -> subprocess.Popen[bytes]:
        record = self.record(host)
        return next(p for p in self.live(host) if record is None or p.pid != record.pid)

    def broadcast(self, payload: bytes, timeout: float) -> BroadcastResult:
        assert self.issuer is not None
        return self.issuer.broadcast(payload, timeout=timeout, include_self=False)

    def one(self) -> None:
        result = self.broadcast(PAYLOAD, BROADCAST_TIMEOUT)
        if result.counts[Outcome.REPLIED] != MEMBERS:
            raise RuntimeError(f"broadcast incomplete: {result.counts}")

    def converge(self, budget: float = 60.0) -> None:
        deadline = time.monotonic() + budget
        last: object = None
        while time.monotonic() < deadline:
            try:
                result = self.broadcast(PAYLOAD, 3.0)
                if (
                    result.counts[Outcome.REPLIED] == MEMBERS
                    and not result.unreachable_hosts
                ):
                    return
                last = result.counts
            except MeshError as exc:
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"pool did not reach {MEMBERS} replies: {last}")

    def close(self) -> None:
        if self.issuer is not None:
            self.issuer.close()


# -- the baseline --------------------------------------------------------------


class Raw:
    """Issuer side of the baseline: forwarded and flat fan-out."""

    def __init__(self, procs: Processes) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.flat = self.ctx.socket(zmq.ROUTER)
        self.flat.setsockopt(zmq.LINGER, 0)
        flat_port = self.flat.bind_to_random_port(f"tcp://{ISSUER_HOST}")
        forwarders: dict[str, tuple[str, str]] = {}
        # The other hosts' forwarders first: the issuer's one connects to them.
        for host in reversed(HOSTS):
            down = [forwarders[h][0] for h in HOSTS[1:]] if host == ISSUER_HOST else []
            proc = procs.start(
                f"raw-forwarder-{host}",
                [sys.executable, "-c", RAW_FORWARDER, host, *down],
                pipe=True,
            )
            up, members = first_line(proc).split()
            forwarders[host] = (up, members)
        for host in HOSTS:
            for i in range(PER_HOST):
                procs.start(
                    f"raw-member-{host}-{i}",
                    [
                        sys.executable,
                        "-c",
                        RAW_MEMBER,
                        host,
                        forwarders[host][1],
                        f"tcp://{ISSUER_HOST}:{flat_port}",
                    ],
                )
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(forwarders[ISSUER_HOST][0])
        self.flat_members: list[bytes] = []
        self._n = 0

    def bid(self) -> bytes:
        self._n += 1
        return b"%d" % self._n

    def forwarded(self, timeout: float = BROADCAST_TIMEOUT) -> None:
        bid = self.bid()
        self.dealer.send_multipart([bid, PAYLOAD])
        got = 0
        while got < MEMBERS:
            if not self.dealer.poll(int(timeout * 1000)):
                raise TimeoutError(f"forwarded fan-out: {got} of {MEMBERS} replies")
            if self.dealer.recv_multipart()[0] == bid:
                got += 1

    def direct(self, timeout: float = BROADCAST_TIMEOUT) -> None:
        bid = self.bid()
        for member in self.flat_members:
            self.flat.send_multipart([member, bid, PAYLOAD])
        got = 0
        while got < MEMBERS:
            if not self.flat.poll(int(timeout * 1000)):
                raise TimeoutError(f"flat fan-out: {got} of {MEMBERS} replies")
            frames = self.flat.recv_multipart()
            if frames[1] == b"HELLO":
                self.flat_members.append(frames[0])
            elif frames[1] == bid:
                got += 1

    def converge(self, budget: float = 60.0) -> None:
        deadline = time.monotonic() + budget
        while len(self.flat_members) < MEMBERS:
            if time.monotonic() > deadline or not self.flat.poll(1000):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"only {len(self.flat_members)} raw members said hello"
                    )
                continue
            frames = self.flat.recv_multipart()
            if frames[1] == b"HELLO":
                self.flat_members.append(frames[0])
        # Every member is connected to the issuer, so it has started; its
        # hello to the forwarder may still be on the way: retry briefly.
        while True:
            try:
                self.forwarded(timeout=0.5)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                while self.dealer.poll(0):
                    self.dealer.recv_multipart()

    def forwarded_in_flight(self, depth: int, seconds: float) -> int:
        """Broadcasts completed in ``seconds`` with ``depth`` kept in flight."""
        counts: dict[bytes, int] = {}
        for _ in range(depth):
            bid = self.bid()
            counts[bid] = 0
            self.dealer.send_multipart([bid, PAYLOAD])
        done = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not self.dealer.poll(int(BROADCAST_TIMEOUT * 1000)):
                raise TimeoutError("forwarded fan-out stalled")
            bid = self.dealer.recv_multipart()[0]
            counts[bid] += 1
            if counts[bid] == MEMBERS:
                del counts[bid]
                done += 1
                bid = self.bid()
                counts[bid] = 0
                self.dealer.send_multipart([bid, PAYLOAD])
        # Drain the ones still in flight so the next block starts clean.
        while counts:
            if not self.dealer.poll(int(BROADCAST_TIMEOUT * 1000)):
                raise TimeoutError("forwarded fan-out stalled")
            bid = self.dealer.recv_multipart()[0]
            counts[bid] += 1
            if counts[bid] == MEMBERS:
                del counts[bid]
        return done

    def close(self) -> None:
        self.dealer.close(linger=0)
        self.flat.close(linger=0)
        self.ctx.term()


def tracked_in_flight(pool: Pool, depth: int, seconds: float) -> int:
    done = [0] * depth
    end = time.monotonic() + seconds

    def caller(i: int) -> None:
        while time.monotonic() < end:
            pool.one()
            done[i] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + BROADCAST_TIMEOUT + 5)
    return sum(done)


def samples(n: int, fn: Callable[[], None]) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


# -- failures ------------------------------------------------------------------


def member_failed(pool: Pool, host: str, sig: signal.Signals) -> tuple[float, str]:
    """Seconds from signalling a busy member until the issuer has it failed."""
    victim = pool.follower(host)
    box: list[tuple[float, BroadcastResult]] = []

    def run() -> None:
        result = pool.broadcast(b"hold:%d" % victim.pid, 20.0)
        box.append((time.monotonic(), result))

    thread = threading.Thread(target=run)
    thread.start()
    # Every other member answers in a few ms; the victim is then holding
    # its request and sending WORKING.
    time.sleep(0.4)
    signalled = time.monotonic()
    os.kill(victim.pid, sig)
    thread.join(25)
    kill(victim)
    if not box:
        raise RuntimeError("broadcast did not return")
    ended, result = box[0]
    failed = [
        m for m in result.with_outcome(Outcome.FAILED) if m.member.pid == victim.pid
    ]
    if not failed or result.counts[Outcome.REPLIED] != MEMBERS - 1:
        raise RuntimeError(f"unexpected outcome: {result.counts}")
    if not failed[0].worked:
        print(f"  (victim pid {victim.pid} never reported WORKING)")
    return ended - signalled, failed[0].reason


def probe(pool: Pool, since: float, expected: int, budget: float) -> float | None:
    """Start time of the first broadcast after ``since`` that reached everyone.

    One broadcast starts every PROBE_SPACING seconds, each on its own thread,
    so a probe that waits out a broken path does not delay the next one.
    """
    found: list[float] = []
    threads = []

    def one(started: float) -> None:
        try:
            result = pool.broadcast(PAYLOAD, PROBE_TIMEOUT)
        except MeshError:
            return
        if result.counts[Outcome.REPLIED] == expected and not result.unreachable_hosts:
            found.append(started)

    while not found and time.monotonic() < since + budget:
        thread = threading.Thread(target=one, args=(time.monotonic(),))
        thread.start()
        threads.append(thread)
        time.sleep(PROBE_SPACING)
    for thread in threads:
        thread.join(PROBE_TIMEOUT + 5)
    return min(found) - since if found else None


def wait_epoch(
    pool: Pool, host: str, epoch: int, since: float, budget: float
) -> float | None:
    """Seconds after ``since`` until ``host`` has a master newer than ``epoch``."""
    while time.monotonic() - since < budget:
        record = pool.record(host)
        if record is not None and record.epoch > epoch:
            return time.monotonic() - since
        time.sleep(0.005)
    return None


def master_failover(
    pool: Pool, host: str, sig: signal.Signals
) -> tuple[float | None, float | None, bool]:
    """(seconds to a new master record, seconds until a broadcast reaches
    every member again, whether the old master died of SIGKILL)."""
    old = pool.record(host)
    assert old is not None
    victim = pool.master(host)
    box: list[float | None] = []
    signalled = time.monotonic()
    os.kill(victim.pid, sig)
    prober = threading.Thread(
        target=lambda: box.append(probe(pool, signalled, MEMBERS - 1, 6.0))
    )
    prober.start()
    took = wait_epoch(pool, host, old.epoch, signalled, 8.0)
    prober.join(15)
    killed_by_members = False
    if sig is signal.SIGSTOP:
        with contextlib.suppress(subprocess.TimeoutExpired):
            killed_by_members = victim.wait(5) == -signal.SIGKILL
    kill(victim)
    return took, box[0] if box else None, killed_by_members


# -- report --------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def row(
    name: str,
    values: list[float | None],
    beat: str,
    goal: str = "",
    ok: bool | None = None,
) -> None:
    got = [v for v in values if v is not None]
    median = f"{statistics.median(got):.2f}s" if got else "never"
    most = f"{max(got):.2f}s" if got else "-"
    if len(got) < len(values):
        most += f" ({len(values) - len(got)} never)"
    tail = f"{goal:<16}{verdict(ok)}" if ok is not None else ""
    print(f"  {name:<42}{median:>7}{most:>8}{len(values):>4}  {beat:<12}{tail}")


def worst(values: list[float | None]) -> float:
    return max((v if v is not None else float("inf")) for v in values)


def measure_broadcasts(pool: Pool, raw: Raw) -> None:
    rounds, n = 5, 200
    for fn in (pool.one, raw.forwarded, raw.direct):
        samples(30, fn)
    tracked: list[float] = []
    forwarded: list[float] = []
    flat: list[float] = []
    # Interleaved blocks: load from elsewhere on the machine falls on all three.
    for _ in range(rounds):
        tracked += samples(n, pool.one)
        forwarded += samples(n, raw.forwarded)
        flat += samples(n, raw.direct)
    ours, base = statistics.median(tracked), statistics.median(forwarded)
    print(f"broadcast to {MEMBERS} members, {len(PAYLOAD)} B payload")
    print(f"  {'':<40}{'srvmesh':>10}{'raw pyzmq':>12}{'ratio':>8}")
    print(
        f"  {'round trip, median':<40}{ours * 1e6:>8.0f}us{base * 1e6:>10.0f}us"
        f"{ours / base:>8.2f}  goal <= 1.50: {verdict(ours / base <= 1.5)}"
    )
    p90 = [sorted(x)[int(len(x) * 0.9)] for x in (tracked, forwarded)]
    print(
        f"  {'round trip, 90th percentile':<40}{p90[0] * 1e6:>8.0f}us"
        f"{p90[1] * 1e6:>10.0f}us{p90[0] / p90[1]:>8.2f}"
    )
    rate = [len(x) / sum(x) for x in (tracked, forwarded)]
    print(
        f"  {'broadcasts/s, one at a time':<40}{rate[0]:>10.0f}{rate[1]:>12.0f}"
        f"{rate[0] / rate[1]:>8.2f}"
    )
    depth, block = 8, 1.5
    ours_n = base_n = 0
    for _ in range(2):
        ours_n += tracked_in_flight(pool, depth, block)
        base_n += raw.forwarded_in_flight(depth, block)
    ours_r, base_r = ours_n / (2 * block), base_n / (2 * block)
    print(
        f"  {f'broadcasts/s, {depth} in flight':<40}{ours_r:>10.0f}{base_r:>12.0f}"
        f"{ours_r / base_r:>8.2f}"
    )
    print(
        f"  {'raw flat fan-out (no forwarders), median':<40}{'':>10}"
        f"{statistics.median(flat) * 1e6:>10.0f}us  (reference)"
    )


def measure_failures(pool: Pool) -> None:
    i = pool.settings.heartbeat_interval
    live = i * pool.settings.heartbeat_liveness
    beat = f"{i * 1000:.0f}ms x {pool.settings.heartbeat_liveness}"
    print(
        f"failure detection and failover: heartbeat interval i = {i * 1000:.0f} ms,"
        f" liveness L = {pool.settings.heartbeat_liveness} beats = {live:.2f}s"
    )
    print(f"  {'':<42}{'median':>7}{'max':>8}{'n':>4}  {'heartbeat':<12}goal")

    def healed() -> None:
        pool.heal()
        pool.converge(30.0)

    killed: list[float | None] = []
    stopped: list[float | None] = []
    reasons = set()
    for host in (HOSTS[1], HOSTS[2], HOSTS[1]):
        took, reason = member_failed(pool, host, signal.SIGKILL)
        killed.append(took)
        reasons.add(f"SIGKILL: {reason}")
        healed()
    for host in (HOSTS[2], HOSTS[1]):
        took, reason = member_failed(pool, host, signal.SIGSTOP)
        stopped.append(took)
        reasons.add(f"SIGSTOP: {reason}")
        healed()
    row(
        "SIGKILLed member -> issuer has it failed",
        killed,
        beat,
        f"<= L = {live:.2f}s",
        worst(killed) <= live,
    )
    row(
        "SIGSTOPped member -> issuer has it failed",
        stopped,
        beat,
        f"<= L+i = {live + i:.2f}s",
        worst(stopped) <= live + i,
    )

    detected: list[float | None] = []
    restored: list[float | None] = []
    after: list[float | None] = []
    for host in (HOSTS[1], HOSTS[2], HOSTS[1]):
        took, back, _ = master_failover(pool, host, signal.SIGKILL)
        detected.append(took)
        restored.append(back)
        after.append(None if took is None or back is None else max(0.0, back - took))
        healed()
    row("master SIGKILL -> new master recorded", detected, beat)
    row("master SIGKILL -> broadcast complete", restored, beat)
    row(
        "  new master recorded -> complete",
        after,
        beat,
        f"<= 2i = {2 * i:.2f}s",
        worst(after) <= 2 * i,
    )

    replaced: list[float | None] = []
    restored = []
    by_quorum = []
    for host in (HOSTS[2], HOSTS[1]):
        took, back, killed_by_members = master_failover(pool, host, signal.SIGSTOP)
        replaced.append(took)
        restored.append(back)
        by_quorum.append(killed_by_members)
        healed()
    row(
        "master SIGSTOP -> new master recorded",
        replaced,
        beat,
        "<= 3.00s",
        worst(replaced) <= 3.0 and all(by_quorum),
    )
    row("master SIGSTOP -> broadcast complete", restored, beat)
    print(f"  failure reasons seen: {'; '.join(sorted(reasons))}")
    print(f"  hung masters killed by their members' quorum: {sum(by_quorum)} of 2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs"
    )
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the finally below kills every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    (tmp / "logs").mkdir()
    (tmp / "dns").mkdir()
    procs = Processes(tmp / "logs")
    dns = DnsProcess(tmp / "dns")
    pool: Pool | None = None
    raw: Raw | None = None
    began = time.monotonic()
    try:
        dns.start()
        pool = Pool(procs, tmp, dns)
        pool.start()
        raw = Raw(procs)
        pool.converge()
        raw.converge()
        print(
            f"pool {POOL!r}: {len(HOSTS)} hosts ({', '.join(HOSTS)}) x {PER_HOST}"
            f" member processes, masters found through mesh dns on {dns.address};"
            f" issuer on {ISSUER_HOST} (ready after {time.monotonic() - began:.1f}s)"
        )
        measure_broadcasts(pool, raw)
        measure_failures(pool)
    finally:
        if pool is not None:
            pool.close()
        if raw is not None:
            raw.close()
        procs.close()
        dns.kill()
        if args.keep_logs:
            print(f"logs kept in {tmp / 'logs'}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"bench took {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
