"""`mesh workload`: the demo's real work, checked end to end.

Concurrent Hits against the blobstore service upload real files, query
them, and compare every answer with a SHA-256 computed here; then one
"stats" broadcast goes to the pool through a temporary member. The summary
shows where the Hits went next to each server's SRV weight, what the calls
cost, and every pool member's outcome. The exit status is 0 only when every
check passed, so scripts and the end-to-end test can rely on it.

Each Hit runs on its own client thread (a Hit belongs to the thread that
opened it) and, on the server, on one dedicated thread that owns a
``sqlite3`` connection: a call that landed on another server thread would
fail there, so a passing run also shows that Hit affinity held.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import socket
import statistics
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from mesh.config import Settings, parse_hostport
from mesh.curve import Curve
from mesh.errors import ConfigError, MeshError

__all__ = [
    "HitReport",
    "WorkloadFile",
    "add_commands",
    "default_files",
    "load_files",
    "percentiles",
]

log = logging.getLogger(__name__)

# The default upload: whole stdlib packages of small modules, plus two big
# modules so that some calls carry hundreds of kilobytes, not only a few.
_DEFAULT_DIRS = ("json", "email", "asyncio")
_DEFAULT_LARGE = ("pydoc_data/topics.py", "_pydecimal.py", "typing.py")
# Enough files that every Hit gets several; few enough that the demo takes
# seconds on a loaded 2-core machine.
_DEFAULT_SMALL_LIMIT = 48


@dataclasses.dataclass(frozen=True)
class WorkloadFile:
    """One file to upload, with the digest every answer is checked against."""

    name: str
    data: bytes
    sha256: str

    @classmethod
    def read(cls, name: str, path: Path) -> WorkloadFile:
        data = path.read_bytes()
        return cls(name, data, hashlib.sha256(data).hexdigest())


def default_files() -> list[tuple[str, Path]]:
    """A few dozen modules of the running Python's standard library, by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    small: list[Path] = []
    for folder in _DEFAULT_DIRS:
        small.extend(sorted((stdlib / folder).glob("*.py")))
    # Spread the cap over all folders instead of taking only the first one.
    step = max(1, math.ceil(len(small) / _DEFAULT_SMALL_LIMIT))
    chosen = small[::step]
    chosen += [stdlib / name for name in _DEFAULT_LARGE if (stdlib / name).is_file()]
    return [(str(p.relative_to(stdlib)), p) for p in chosen]


def load_files(paths: Sequence[str]) -> list[WorkloadFile]:
    """The files named (directories are walked), or the default set."""
    named: list[tuple[str, Path]] = []
    if not paths:
        named = default_files()
    for text in paths:
        path = Path(text)
        if path.is_dir():
            named.extend(
                (str(p.relative_to(path.parent)), p)
                for p in sorted(path.rglob("*"))
                if p.is_file() and not p.is_symlink()
            )
        elif path.is_file():
            named.append((text, path))
        else:
            raise ConfigError(f"workload file {text!r} is not a file or directory")
    files: dict[str, WorkloadFile] = {}
    for name, path in named:
        try:
            files[name] = WorkloadFile.read(name, path)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if not files:
        raise ConfigError("the workload has no files to upload")
    return list(files.values())


def share_files(files: Sequence[WorkloadFile], hits: int) -> list[list[WorkloadFile]]:
    """Each Hit's files: every file is used, and every Hit gets at least one."""
    per_hit = max(1, math.ceil(len(files) / hits))
    return [
        [files[(h * per_hit + j) % len(files)] for j in range(per_hit)]
        for h in range(hits)
    ]


def percentiles(samples: Sequence[float], points: Sequence[int]) -> list[float]:
    """The given percentiles of ``samples`` (the inclusive method; 0 if empty)."""
    if not samples:
        return [0.0 for _ in points]
    if len(samples) == 1:
        return [samples[0] for _ in points]
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return [cuts[p - 1] for p in points]


@dataclasses.dataclass
class HitReport:
    """What one Hit did and what went wrong in it."""

    index: int
    endpoint: str = ""
    files: int = 0
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


class _Caller:
    """Runs calls of one Hit, timing each and counting the bytes both ways."""

    def __init__(self, hit: Any, report: HitReport) -> None:
        self.hit = hit
        self.report = report

    def __call__(self, method: str, *args: bytes | str) -> Any:
        sent = sum(len(a.encode() if isinstance(a, str) else a) for a in args)
        start = time.perf_counter()
        reply = self.hit.call(method, *args)
        self.report.latencies.append(time.perf_counter() - start)
        self.report.calls += 1
        self.report.bytes_sent += sent + len(method)
        self.report.bytes_received += sum(f.nbytes for f in reply)
        return reply

    def check(self, what: str, got: object, want: object) -> None:
        if got != want:
            self.report.failures.append(
                f"Hit {self.report.index} on {self.report.endpoint}: {what}: "
                f"got {got!r}, expected {want!r}"
            )


def run_hit(client: Any, index: int, files: Sequence[WorkloadFile]) -> HitReport:
    """Open one Hit, load ``files`` into it, query them back, and close it."""
    report = HitReport(index, files=len(files))
    try:
        with client.hit({"workload": index}) as hit:
            report.endpoint = hit.endpoint
            call = _Caller(hit, report)
            thread = call("thread").text()
            for f in files:
                call.check(
                    f"put {f.name} digest", call("put", f.name, f.data).text(), f.sha256
                )
            for f in files:
                call.check(f"sha256 {f.name}", call("sha256", f.name).text(), f.sha256)
                call.check(
                    f"size {f.name}", int(call("size", f.name).text()), len(f.data)
                )
                data = call("get", f.name).bytes()
                call.check(
                    f"get {f.name} digest", hashlib.sha256(data).hexdigest(), f.sha256
                )
            names = sorted({f.name for f in files})
            call.check("count", int(call("count").text()), len(names))
            call.check("names", [r.tobytes().decode() for r in call("names")], names)
            # The same server thread from the first call to the last.
            call.check("server thread", call("thread").text(), thread)
    except MeshError as exc:
        where = f" on {report.endpoint}" if report.endpoint else ""
        report.failures.append(f"Hit {index}{where}: {type(exc).__name__}: {exc}")
    return report


def local_address_towards(nameserver: str) -> str:
    """The address this machine uses to reach ``nameserver`` (no packet is sent).

    A temporary pool member must bind where the other hosts' masters can
    reach it: loopback for a loopback mesh, the bridge address for hosts in
    network namespaces, the outward address for a real network.
    """
    host, port = parse_hostport(nameserver, default_port=53)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


# ---- the broadcast ---------------------------------------------------------


@dataclasses.dataclass
class BroadcastReport:
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    expected_hosts: list[str] = dataclasses.field(default_factory=list)


def _master_hosts(settings: Settings, pool: str) -> list[str]:
    from mesh.discovery.resolve import Resolver
    from mesh.errors import ServiceNotFound
    from mesh.pool.directory import master_service_name

    resolver = Resolver(settings.nameservers, timeout=settings.dns_timeout)
    try:
        targets = resolver.resolve(master_service_name(pool, settings.zone))
    except ServiceNotFound:
        return []
    return sorted({t.host for t in targets})


def broadcast_stats(
    settings: Settings, pool: str, host: str, timeout: float, budget: float
) -> BroadcastReport:
    """Send "stats" to every member of ``pool`` and check each one replied.

    The temporary member becomes master of its own host and learns the other
    masters from DNS a moment after it starts; until then a broadcast would
    reach only its own host. So the broadcast is repeated (it only reads
    counters) until it covered every host advertising a master, within
    ``budget`` seconds.
    """
    from mesh.pool.member import PoolMember
    from mesh.pool.tracker import Outcome

    report = BroadcastReport()

    def refuse(payload: bytes) -> bytes:
        raise RuntimeError("the workload's temporary member serves no broadcasts")

    deadline = time.monotonic() + budget
    member = PoolMember(pool, settings, refuse, host)
    with member:
        while True:
            expected = [h for h in _master_hosts(settings, pool) if h != host]
            result = member.broadcast(b"stats", timeout=timeout, include_self=False)
            seen = {m.member.host for m in result.members}
            covered = bool(expected) and set(expected) <= seen
            if (covered and result.complete) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    report.expected_hosts = expected
    if not expected:
        report.failures.append(f"pool {pool!r} has no master registered in DNS")
    for host_missing in sorted(set(expected) - seen):
        report.failures.append(f"broadcast did not reach host {host_missing}")
    for unreachable in result.unreachable_hosts:
        report.failures.append(
            f"host {unreachable.host} unreachable: {unreachable.reason}"
        )
    for m in result.members:
        row: dict[str, Any] = {
            "member": m.member.id,
            "host": m.member.host,
            "pid": m.member.pid,
            "outcome": m.outcome.value,
            "detail": m.reason,
        }
        if m.outcome is Outcome.REPLIED and m.reply is not None:
            try:
                row["stats"] = json.loads(m.reply)
            except ValueError:
                row["detail"] = m.reply[:80].decode(errors="replace")
        else:
            report.failures.append(
                f"member {m.member.id} on {m.member.host}: {m.outcome.value} {m.reason}"
            )
        report.rows.append(row)
    report.rows.sort(key=lambda r: (r["host"], r["pid"]))
    return report


# ---- the summary -----------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 1024**2:.2f} MiB"


def _table(rows: Sequence[Sequence[str]], out: IO[str], indent: str = "  ") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        out.write(indent + "  ".join([*cells, row[-1]]).rstrip() + "\n")


def summarize(
    reports: Sequence[HitReport],
    targets: Sequence[Any],
    broadcast: BroadcastReport | None,
    out: IO[str],
) -> None:
    """Hits per server beside its SRV weight, call totals, latency, broadcast."""
    by_endpoint: dict[str, int] = {}
    for r in reports:
        if r.endpoint:
            by_endpoint[r.endpoint] = by_endpoint.get(r.endpoint, 0) + 1
    # RFC 2782: weights only compete within the lowest priority in use.
    top = min((t.priority for t in targets), default=0)
    total_weight = sum(t.weight for t in targets if t.priority == top)
    opened = sum(by_endpoint.values())
    rows = [("SERVER", "PRI", "WEIGHT", "EXPECTED", "HITS", "SHARE")]
    known = set()
    for t in sorted(targets, key=lambda t: (t.priority, -t.weight, t.name, t.port)):
        known.add(t.endpoint)
        hits = by_endpoint.get(t.endpoint, 0)
        expected = (
            f"{100 * t.weight / total_weight:.0f}%"
            if t.priority == top and total_weight
            else "-"
        )
        share = f"{100 * hits / opened:.0f}%" if opened else "-"
        rows.append(
            (
                f"{t.name.rstrip('.')} {t.host}:{t.port}",
                str(t.priority),
                str(t.weight),
                expected,
                str(hits),
                share,
            )
        )
    for endpoint, hits in sorted(by_endpoint.items()):
        if endpoint not in known:
            # A server that registered or left after we resolved.
            rows.append(
                (endpoint, "-", "-", "-", str(hits), f"{100 * hits / opened:.0f}%")
            )
    out.write("Hits per server (SRV weight gives the expected share):\n")
    _table(rows, out)

    calls = sum(r.calls for r in reports)
    sent = sum(r.bytes_sent for r in reports)
    received = sum(r.bytes_received for r in reports)
    latencies = [x for r in reports for x in r.latencies]
    p50, p90, p99 = (1000 * v for v in percentiles(latencies, (50, 90, 99)))
    out.write(
        f"calls: {calls} in {opened} Hits; bytes moved: {_mib(sent + received)} "
        f"({_mib(sent)} up, {_mib(received)} down)\n"
        f"call latency: p50 {p50:.2f} ms, p90 {p90:.2f} ms, p99 {p99:.2f} ms\n"
    )
    if broadcast is not None:
        outcomes: dict[str, int] = {}
        for row in broadcast.rows:
            outcomes[row["outcome"]] = outcomes.get(row["outcome"], 0) + 1
        counted = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
        out.write(
            f"broadcast: {len(broadcast.rows)} members on "
            f"{len({r['host'] for r in broadcast.rows})} hosts: {counted or 'none'}\n"
        )


def _print_broadcast(report: BroadcastReport, out: IO[str]) -> None:
    rows = [("MEMBER", "HOST", "PID", "OUTCOME", "HITS", "CALLS", "STORED", "DETAIL")]
    for row in report.rows:
        stats = row.get("stats") or {}
        rows.append(
            (
                row["member"],
                row["host"],
                str(row["pid"]),
                row["outcome"],
                str(stats.get("hits_opened", "-")),
                str(stats.get("calls", "-")),
                _mib(int(stats["bytes_stored"])) if "bytes_stored" in stats else "-",
                row["detail"],
            )
        )
    _table(rows, out)


# ---- the command -----------------------------------------------------------


def run(args: argparse.Namespace, settings: Settings, out: IO[str]) -> int:
    from mesh.discovery.names import service_name
    from mesh.discovery.resolve import Resolver
    from mesh.hit.client import Client

    if args.hits < 1 or args.concurrency < 1:
        raise ConfigError("--hits and --concurrency must be at least 1")
    files = load_files(args.paths)
    srv_name = str(service_name(args.service, settings.zone))
    size = sum(len(f.data) for f in files)
    out.write(
        f"workload: {args.hits} Hits, {args.concurrency} at a time, on {srv_name}; "
        f"{len(files)} files ({_mib(size)})\n"
    )
    out.flush()
    resolver = Resolver(
        settings.nameservers,
        timeout=settings.dns_timeout,
        stale_grace=settings.stale_grace,
        zone=settings.zone,
    )
    # What DNS offers, for the summary: the client orders the same records.
    targets = Resolver(settings.nameservers, timeout=settings.dns_timeout).resolve(
        srv_name
    )
    shares = share_files(files, args.hits)
    reports: list[HitReport] = []
    with Client(
        srv_name,
        resolver=resolver,
        open_timeout=settings.open_timeout,
        call_timeout=settings.call_timeout,
        max_message_size=settings.max_message_size,
        max_frames=settings.max_frames,
        curve=Curve.from_settings(settings),
    ) as client:
        with concurrent.futures.ThreadPoolExecutor(
            args.concurrency, thread_name_prefix="workload-hit"
        ) as pool:
            futures = [
                pool.submit(run_hit, client, i, shares[i]) for i in range(args.hits)
            ]
            # One line, rewritten in place on a terminal; written once otherwise.
            live = out.isatty()
            line = ""
            for future in concurrent.futures.as_completed(futures):
                reports.append(future.result())
                failed = sum(1 for r in reports if r.failures)
                line = f"  Hits done: {len(reports)}/{args.hits}, {failed} failed"
                if live:
                    out.write("\r" + line)
                    out.flush()
    out.write(("" if live else line) + "\n")
    reports.sort(key=lambda r: r.index)
    failures = [f for r in reports for f in r.failures]

    broadcast: BroadcastReport | None = None
    if args.pool:
        host = args.host or local_address_towards(settings.nameservers[0])
        out.write(f'broadcast "stats" to pool {args.pool} from {host}:\n')
        out.flush()
        broadcast = broadcast_stats(
            settings, args.pool, host, args.broadcast_timeout, args.broadcast_budget
        )
        _print_broadcast(broadcast, out)
        failures += broadcast.failures

    summarize(reports, targets, broadcast, out)
    if failures:
        out.write(f"FAILED: {len(failures)} check(s):\n")
        for line in failures[:50]:
            out.write(f"  {line}\n")
        return 1
    checks = sum(r.calls for r in reports)
    out.write(f"OK: every answer of {checks} calls matched its local SHA-256\n")
    return 0


def _cmd_workload(args: argparse.Namespace) -> int:
    from mesh.cli import settings_from_args

    return run(args, settings_from_args(args), sys.stdout)


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    from mesh.cli import add_settings_arguments

    p = sub.add_parser(
        "workload",
        help="run concurrent checked Hits on real files, then a pool broadcast",
        description="Open concurrent Hits on a blobstore service "
        "(mesh.examples.blobstore), upload files, query them and check every "
        "answer against a SHA-256 computed here; then broadcast 'stats' to the "
        "pool and print a summary. Exits 0 only if every check passed.",
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="files or directories to upload (default: a set of stdlib modules)",
    )
    p.add_argument("--service", default="blobstore", help="service name (blobstore)")
    p.add_argument("--hits", type=int, default=32, help="Hits to run (32)")
    p.add_argument("--concurrency", type=int, default=4, help="Hits at a time (4)")
    p.add_argument(
        "--pool",
        default="blobstore",
        help="pool to broadcast 'stats' to (blobstore); '' skips the broadcast",
    )
    p.add_argument(
        "--host",
        help="address for the temporary pool member "
        "(default: this machine's address towards the first nameserver)",
    )
    p.add_argument(
        "--broadcast-timeout",
        type=float,
        default=10.0,
        help="seconds one broadcast may take (10)",
    )
    p.add_argument(
        "--broadcast-budget",
        type=float,
        default=20.0,
        help="seconds to keep trying until every host is reached (20)",
    )
    add_settings_arguments(p)
    p.set_defaults(func=_cmd_workload, log_default=logging.WARNING)
