"""`mesh up`: run a whole mesh on this machine from a TOML manifest.

A manifest names the zone, the responder and, for each host, the services and
pools with their replica counts. ``mesh up`` starts the responder, then every
server process, waits until DNS serves every expected SRV record, and stays in
the foreground supervising them: a server that exits is restarted with
exponential backoff. Ctrl-C or SIGTERM stops everything in reverse order;
servers deregister themselves on SIGTERM before they exit.

Hosts are loopback addresses by default (127.0.0.2, 127.0.0.3, ...), which
needs no privileges. With ``--netns`` each host is a network namespace joined
to the others by veth links on a bridge, so each host has its own stack.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tenacity

from mesh.config import Settings, format_hostport, parse_hostport
from mesh.curve import MeshKeys, ensure_mesh_keys
from mesh.errors import ConfigError, DiscoveryError, MeshError
from mesh.netns import NetnsLayout

__all__ = [
    "HostSpec",
    "Manifest",
    "ProcessSpec",
    "ServiceSpec",
    "Supervisor",
    "add_commands",
    "load_manifest",
]

log = logging.getLogger(__name__)

# RFC 6335 section 5.1: a service name is at most 15 characters, letters,
# digits and hyphens, starting with a letter.
_SERVICE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """Servers of one service on one host."""

    name: str
    handler: str
    replicas: int = 1
    priority: int = 0
    weight: int = 1
    pool: str | None = None


@dataclasses.dataclass(frozen=True)
class HostSpec:
    name: str
    address: str
    services: tuple[ServiceSpec, ...]


@dataclasses.dataclass(frozen=True)
class Manifest:
    zone: str
    dns_listen: str
    key_file: Path | None
    state_dir: Path | None
    runtime_dir: Path | None
    lease: float
    hosts: tuple[HostSpec, ...]
    path: Path
    curve: bool = True
    curve_dir: Path | None = None

    def expected_records(self) -> dict[str, int]:
        """SRV name -> how many records `mesh up` waits for before it is ready."""
        expected: dict[str, int] = {}
        for host in self.hosts:
            for svc in host.services:
                name = f"_{svc.name}._tcp.{self.zone}"
                expected[name] = expected.get(name, 0) + svc.replicas
        return expected

    def pools(self) -> dict[str, list[str]]:
        """Pool name -> the host names that run members of it."""
        pools: dict[str, list[str]] = {}
        for host in self.hosts:
            for svc in host.services:
                if svc.pool and host.name not in pools.setdefault(svc.pool, []):
                    pools[svc.pool].append(host.name)
        return pools


def _check_service_name(name: str, where: str) -> None:
    if not (
        0 < len(name) <= 15
        and set(name) <= _SERVICE_CHARS
        and name[0].isalpha()
        and not name.endswith("-")
    ):
        raise ConfigError(
            f"{where}: service name {name!r} is not an RFC 6335 name "
            "(1-15 lower-case letters, digits and hyphens, starting with a letter)"
        )


def _int(
    table: dict[str, Any], key: str, default: int, where: str, low: int, high: int
) -> int:
    value = table.get(key, default)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not low <= value <= high
    ):
        raise ConfigError(
            f"{where}: {key} must be an integer from {low} to {high}, not {value!r}"
        )
    return value


def _bool(table: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, not {value!r}")
    return value


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and check a manifest; every mistake is a ConfigError naming where it is."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"manifest {path} is not valid TOML: {exc}") from None

    curve = data.get("curve", {})
    if not isinstance(curve, dict):
        raise ConfigError(f"manifest {path}: curve must be a table ([curve])")
    zone = str(data.get("zone", "mesh.internal."))
    if not zone.endswith("."):
        zone += "."
    responder = data.get("responder", {})
    dns_listen = str(responder.get("listen", "127.0.0.1:5353"))
    parse_hostport(dns_listen)

    def _path(value: Any) -> Path | None:
        if value is None:
            return None
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else (path.parent / p).resolve()

    hosts: list[HostSpec] = []
    seen_addresses: set[str] = set()
    raw_hosts = data.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise ConfigError(f"manifest {path} has no [[hosts]]")
    for i, raw in enumerate(raw_hosts, 1):
        where = f"{path.name}: host {i}"
        name = str(raw.get("name", f"host-{i}"))
        address = str(raw.get("address", f"127.0.0.{i + 1}"))
        if address in seen_addresses:
            raise ConfigError(f"{where}: address {address} is used by two hosts")
        seen_addresses.add(address)
        services = []
        for j, svc in enumerate(raw.get("services", []), 1):
            swhere = f"{where} ({name}), service {j}"
            sname = str(svc.get("name", ""))
            _check_service_name(sname, swhere)
            handler = str(svc.get("handler", ""))
            if ":" not in handler:
                raise ConfigError(
                    f"{swhere}: handler must be 'module:Class', not {handler!r}"
                )
            pool = svc.get("pool")
            if pool is not None:
                _check_service_name(str(pool), swhere + " pool")
            services.append(
                ServiceSpec(
                    name=sname,
                    handler=handler,
                    replicas=_int(svc, "replicas", 1, swhere, 0, 64),
                    priority=_int(svc, "priority", 0, swhere, 0, 65535),
                    weight=_int(svc, "weight", 1, swhere, 0, 65535),
                    pool=None if pool is None else str(pool),
                )
            )
        hosts.append(HostSpec(name=name, address=address, services=tuple(services)))

    return Manifest(
        zone=zone,
        dns_listen=dns_listen,
        key_file=_path(responder.get("key_file")),
        state_dir=_path(data.get("state_dir")),
        runtime_dir=_path(data.get("runtime_dir")),
        lease=float(data.get("lease", 30.0)),
        hosts=tuple(hosts),
        path=path,
        curve=_bool(curve, "enabled", True, f"{path.name}: [curve]"),
        curve_dir=_path(curve.get("keys_dir")),
    )


@dataclasses.dataclass
class ProcessSpec:
    """One supervised process: what to run, and how to tell it apart in logs."""

    name: str
    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    restart: bool = True


@dataclasses.dataclass
class _Running:
    spec: ProcessSpec
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0


class Supervisor:
    """Starts processes in order, restarts the ones that die, stops them in reverse.

    A process that stays up longer than ``stable_after`` seconds has its
    backoff reset, so a server that crashes once a day restarts at once.
    """

    def __init__(
        self,
        *,
        stop_timeout: float = 5.0,
        stable_after: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._running: list[_Running] = []
        self._stop_timeout = stop_timeout
        self._stable_after = stable_after
        self._clock = clock
        # Exponential backoff with jitter between restarts of one process,
        # from tenacity's wait strategies so the policy reads like our retries.
        self._retrying = tenacity.Retrying()
        self._wait = tenacity.wait_exponential(
            multiplier=0.5, max=10
        ) + tenacity.wait_random(0, 0.5)

    def start(self, spec: ProcessSpec) -> subprocess.Popen[bytes]:
        entry = _Running(spec)
        self._running.append(entry)
        self._spawn(entry)
        assert entry.proc is not None
        return entry.proc

    def _spawn(self, entry: _Running) -> None:
        env = dict(os.environ)
        env.update(entry.spec.env)
        # A new session, so Ctrl-C at the terminal reaches only `mesh up`, which
        # then stops the children in order instead of all at once.
        entry.proc = subprocess.Popen(entry.spec.argv, env=env, start_new_session=True)
        entry.started_at = self._clock()
        log.info("started %s (pid %d)", entry.spec.name, entry.proc.pid)

    def processes(self) -> dict[str, subprocess.Popen[bytes] | None]:
        return {e.spec.name: e.proc for e in self._running}

    def restarts(self) -> dict[str, int]:
        return {e.spec.name: e.restarts for e in self._running}

    def poll(self) -> None:
        """Reap exited processes and restart those whose backoff has run out."""
        now = self._clock()
        for entry in self._running:
            if entry.proc is not None:
                code = entry.proc.poll()
                if code is None:
                    continue
                if not entry.spec.restart:
                    continue
                uptime = now - entry.started_at
                if uptime > self._stable_after:
                    entry.restarts = 0
                entry.restarts += 1
                state = tenacity.RetryCallState(
                    retry_object=self._retrying, fn=None, args=(), kwargs={}
                )
                state.attempt_number = entry.restarts
                delay = self._wait(state)
                entry.next_start = now + delay
                entry.proc = None
                log.warning(
                    "%s exited with status %s after %.1f s; restarting in %.1f s (restart %d)",
                    entry.spec.name,
                    code,
                    uptime,
                    delay,
                    entry.restarts,
                )
            elif now >= entry.next_start:
                self._spawn(entry)

    def stop(self, keep: int = 0) -> None:
        """SIGTERM each process, newest first, waiting up to stop_timeout for each.

        The first ``keep`` processes started are left running (and are no
        longer restarted only once they are stopped too).
        """
        for entry in reversed(self._running[keep:]):
            proc = entry.proc
            entry.spec.restart = False
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self._stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s ignored SIGTERM for %.0f s; killing it",
                    entry.spec.name,
                    self._stop_timeout,
                )
                proc.kill()
                proc.wait(self._stop_timeout)
            log.info("stopped %s (status %s)", entry.spec.name, proc.returncode)


def _mesh_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh", *args]


def child_log_level(verbose: int) -> str:
    """``MESH_LOG_LEVEL`` for what `mesh up` starts: WARNING, INFO with -v, DEBUG with -vv.

    At INFO every Hit opened and every record registered is a line, which
    buries the progress line and the workload's summary; problems still show.
    """
    return ("WARNING", "INFO", "DEBUG")[min(max(verbose, 0), 2)]


def plan(
    manifest: Manifest,
    settings: Settings,
    netns: NetnsLayout | None = None,
    log_level: str = "WARNING",
    keys: MeshKeys | None = None,
) -> list[ProcessSpec]:
    """Every process `mesh up` starts, in start order (responder first).

    Shared settings travel as ``MESH_*`` environment variables, the same way a
    systemd unit's environment file passes them; only what differs between
    processes is a flag.
    """
    env = {
        "MESH_ZONE": manifest.zone,
        "MESH_NAMESERVERS": ",".join(settings.nameservers),
        "MESH_KEY_FILE": str(settings.resolved_key_file),
        "MESH_STATE_DIR": str(settings.state_dir),
        "MESH_LEASE": str(settings.lease),
        "MESH_LOG_LEVEL": os.environ.get("MESH_LOG_LEVEL") or log_level,
        **(keys.env() if keys is not None else {}),
    }
    specs = [
        ProcessSpec(
            "responder", _mesh_argv("dns", "--listen", settings.dns_listen), env
        )
    ]
    for host in manifest.hosts:
        host_env = dict(env, MESH_RUNTIME_DIR=str(settings.runtime_dir / host.name))
        address = host.address if netns is None else netns[host.name].address
        for svc in host.services:
            for i in range(svc.replicas):
                argv = _mesh_argv(
                    "serve",
                    svc.handler,
                    "--service",
                    svc.name,
                    "--bind",
                    address,
                    "--host-name",
                    host.name,
                    "--priority",
                    str(svc.priority),
                    "--weight",
                    str(svc.weight),
                )
                if svc.pool:
                    argv += ["--pool", svc.pool]
                if netns is not None:
                    argv = ["ip", "netns", "exec", netns[host.name].namespace, *argv]
                specs.append(
                    ProcessSpec(f"{host.name}/{svc.name}-{i + 1}", argv, host_env)
                )
    return specs


def wait_until_served(
    settings: Settings,
    expected: dict[str, int],
    timeout: float,
    supervisor: Supervisor | None = None,
    out: Any = sys.stderr,
) -> None:
    """Poll DNS until every SRV name serves its expected count, with a progress line."""
    import dns.resolver

    from mesh.discovery.resolve import Resolver

    deadline = time.monotonic() + timeout
    total = sum(expected.values())
    last = ""
    while True:
        served = 0
        for name, count in expected.items():
            # A fresh resolver each round: the point is what DNS says now.
            resolver = Resolver(settings.nameservers, timeout=1.0)
            try:
                served += min(
                    count, len({(t.host, t.port) for t in resolver.resolve(name)})
                )
            except (DiscoveryError, dns.resolver.NoAnswer):
                pass
        line = f"waiting for DNS: {served}/{total} SRV records served"
        if line != last and out is not None:
            # Rewritten in place on a terminal; one line per change in a log,
            # where a carriage return would run into the next log line.
            tty = out.isatty()
            out.write(("\r" + line) if tty else line + "\n")
            out.flush()
            last = line
        if served >= total:
            if out is not None and out.isatty():
                out.write("\n")
            return
        if time.monotonic() > deadline:
            if out is not None and out.isatty():
                out.write("\n")
            raise MeshError(
                f"only {served} of {total} SRV records were served after {timeout:.0f} s; "
                "see the server logs above"
            )
        if supervisor is not None:
            supervisor.poll()
        time.sleep(0.2)


class _Stop(Exception):
    pass


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into an exception the main loop unwinds on."""

    def handler(signum: int, frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _banner(
    manifest: Manifest,
    settings: Settings,
    keys: MeshKeys | None,
    command: Sequence[str] = (),
) -> str:
    host, port = parse_hostport(settings.dns_listen)
    lines = [
        f"mesh is up: zone {manifest.zone} served at {format_hostport(host, port)}"
    ]
    for name in manifest.expected_records():
        lines.append(f"  dig @{host} -p {port} {name} SRV")
    lines.append(f"  export MESH_NAMESERVERS={format_hostport(host, port)}")
    lines.append(f"  export MESH_KEY_FILE={settings.resolved_key_file}")
    for name, value in (keys.env() if keys is not None else {}).items():
        lines.append(f"  export {name}={value}")
    if command:
        lines.append(f"running {shlex.join(command)}; the mesh stops when it ends.")
    else:
        lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)


def up(
    manifest: Manifest,
    settings: Settings,
    *,
    use_netns: bool = False,
    command: Sequence[str] = (),
    ready_timeout: float = 60.0,
    verbose: int = 0,
) -> int:
    """Run the manifest; with ``command``, run it once the mesh is up, then stop."""
    from mesh.keyfile import generate_key_file

    key_file = settings.resolved_key_file
    if not key_file.exists():
        generate_key_file(key_file)
    keys = None
    if manifest.curve:
        keys = ensure_mesh_keys(manifest.curve_dir or settings.state_dir / "curve")
    settings.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    supervisor = Supervisor()
    status = 0
    with _signals_raise(), _netns_hosts(manifest, use_netns) as layout:
        if layout is not None:
            # Hosts in namespaces reach the responder through the bridge.
            _, port = parse_hostport(settings.dns_listen)
            listen = format_hostport(layout.gateway, port)
            settings = dataclasses.replace(
                settings, dns_listen=listen, nameservers=[listen]
            )
        check_port_free(settings.dns_listen)
        try:
            level = child_log_level(verbose)
            for spec in plan(manifest, settings, layout, level, keys):
                supervisor.start(spec)
            wait_until_served(
                settings, manifest.expected_records(), ready_timeout, supervisor
            )
            print(_banner(manifest, settings, keys, command), flush=True)
            if command:
                env = dict(os.environ)
                env.update(
                    MESH_NAMESERVERS=",".join(settings.nameservers),
                    MESH_ZONE=manifest.zone,
                    MESH_KEY_FILE=str(key_file),
                    # Its own host's runtime dir, beside the manifest hosts':
                    # a temporary pool member it starts is cleaned up with them.
                    MESH_RUNTIME_DIR=str(settings.runtime_dir),
                    MESH_LOG_LEVEL=os.environ.get("MESH_LOG_LEVEL") or level,
                    **(keys.env() if keys is not None else {}),
                )
                child = subprocess.Popen(list(command), env=env)
                while child.poll() is None:
                    supervisor.poll()
                    time.sleep(0.2)
                status = child.returncode
                log.info("%s exited with status %d", shlex.join(command), status)
            else:
                while True:
                    supervisor.poll()
                    time.sleep(0.2)
        except _Stop as stop:
            log.info("%s: stopping the mesh", stop)
            status = 0
        finally:
            # Servers first; they deregister on SIGTERM. The responder stays
            # up a moment longer to take the deletes of what killed servers
            # left behind, so the journal keeps nothing of this mesh.
            supervisor.stop(keep=1)
            responder = supervisor.processes().get("responder")
            if responder is not None and responder.poll() is None:
                purge_records(manifest, settings)
            supervisor.stop()
            clean_runtime_dirs(
                [settings.runtime_dir / h.name for h in manifest.hosts]
                + [settings.runtime_dir]
            )
    return status


def check_port_free(listen: str) -> None:
    """Fail now, clearly, when the responder's address is taken.

    Otherwise the responder would exit, be restarted with backoff, and every
    server would fail to register until the ready timeout ran out.
    """
    host, port = parse_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind, name in ((socket.SOCK_DGRAM, "UDP"), (socket.SOCK_STREAM, "TCP")):
        with socket.socket(family, kind) as probe:
            if kind == socket.SOCK_STREAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ConfigError(
                    f"cannot run the responder on {listen}: {name} port {port} "
                    f"is taken ({exc.strerror}). Stop what uses it, or change "
                    "[responder] listen in the manifest."
                ) from None


def purge_records(manifest: Manifest, settings: Settings) -> int:
    """Delete the manifest's SRV records still in DNS once its servers stopped.

    A server that stopped cleanly has deleted its own records; one that was
    killed (and then replaced by a restart) left its records to run out
    their lease. Every server of the manifest is stopped when this runs, so
    whatever is left under its service and pool names is stale. Returns how
    many SRV records were deleted; failures are logged, since the leases
    remove the records anyway.
    """
    from mesh.discovery.cli import list_services
    from mesh.discovery.register import Registrar
    from mesh.keyfile import load_key
    from mesh.pool.directory import master_service_name

    names = {n.lower() for n in manifest.expected_records()}
    names |= {master_service_name(p, manifest.zone).lower() for p in manifest.pools()}
    deleted = 0
    try:
        key = load_key(settings.resolved_key_file)
        rows = list_services(settings.nameservers, settings.zone, key, timeout=2.0)
        registrar = Registrar(
            settings.nameservers, settings.zone, key, timeout=1.0, budget=3.0
        )
        for row in rows:
            if str(row["service"]).lower() not in names:
                continue
            deleted += registrar.unregister(
                row["service"], row["target"], row["port"], row["addresses"]
            )
    except MeshError as exc:
        log.warning("could not delete records left by killed servers: %s", exc)
    if deleted:
        log.info("deleted %d SRV record(s) left by killed servers", deleted)
    return deleted


def clean_runtime_dirs(dirs: Sequence[Path]) -> None:
    """Remove the election files `mesh up`'s processes left, once nobody uses them.

    The lock, master record and member files of a pool stay on disk when
    their processes exit (the lock is only an ``flock``; the record keeps the
    epoch rising while the pool lives). After every process of the mesh has
    stopped they mean nothing, so they go, unless some process outside this
    mesh still holds a lock or is a live member: then the directory stays.
    """
    import fcntl

    from mesh.pool.election import process_alive

    for folder in dirs:
        try:
            entries = list(folder.iterdir())
        except FileNotFoundError:
            continue
        in_use = False
        for lock in [p for p in entries if p.suffix == ".lock"]:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                in_use = True
            finally:
                os.close(fd)
        for members in [p for p in entries if p.name.endswith(".members")]:
            for entry in members.glob("[!.]*"):
                try:
                    data = json.loads(entry.read_text())
                    alive = process_alive(int(data["pid"]), int(data["start_time"]))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                in_use = in_use or alive
        if in_use:
            log.warning("%s is still in use by another process; left in place", folder)
            continue
        for path in entries:
            if path.is_dir() and path.name.endswith((".members", ".votes")):
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file() and path.suffix in (".lock", ".master"):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            # Only when empty: a host directory holds nothing else of ours.
            folder.rmdir()


@contextmanager
def _netns_hosts(manifest: Manifest, enabled: bool) -> Iterator[NetnsLayout | None]:
    if not enabled:
        yield None
        return
    from mesh import netns

    with netns.hosts([h.name for h in manifest.hosts]) as layout:
        yield layout


def _cmd_up(args: argparse.Namespace) -> int:
    from mesh.cli import settings_from_args

    command = list(args.run)
    if command[:1] != ["--"] and command[:1] and command[0].startswith("-"):
        # REMAINDER also takes options written after the manifest
        # (`mesh up m.toml -v -- cmd`): parse those, up to the "--", again,
        # ahead of the manifest so that REMAINDER gets nothing this time.
        cut = command.index("--") if "--" in command else len(command)
        manifest_path = args.manifest
        args._parser.parse_args([*command[:cut], manifest_path], namespace=args)
        if args.run or args.manifest != manifest_path:
            raise ConfigError(
                f"cannot tell options from the command in {shlex.join(command)!r}. "
                "Put the command to run after '--'."
            )
        command = command[cut:]
    # argparse drops a "--" right after the manifest but not a later one.
    command = command[1:] if command[:1] == ["--"] else command
    manifest = load_manifest(args.manifest)
    extra: dict[str, Any] = {"dns_listen": manifest.dns_listen, "lease": manifest.lease}
    # The manifest's paths beat MESH_* variables; a flag beats the manifest.
    args.key_file = args.key_file or manifest.key_file
    args.state_dir = args.state_dir or manifest.state_dir
    args.runtime_dir = args.runtime_dir or manifest.runtime_dir
    args.zone = args.zone or manifest.zone
    args.nameservers = args.nameservers or manifest.dns_listen
    settings = settings_from_args(args, **extra)
    if args.netns and os.geteuid() != 0:
        raise ConfigError(
            "--netns needs root (network namespaces); run without it for loopback hosts"
        )
    return up(
        manifest,
        settings,
        use_netns=args.netns,
        command=command,
        ready_timeout=args.ready_timeout,
        verbose=args.verbose,
    )


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    from mesh.cli import add_settings_arguments

    p = sub.add_parser(
        "up",
        help="run a local mesh from a manifest",
        description="Start the responder and every server of a manifest, supervise them, "
        "and stop them all on Ctrl-C. With a command after --, run it once the mesh is up, "
        "then stop the mesh and exit with the command's status.",
    )
    p.add_argument("manifest", help="TOML manifest, e.g. deploy/local.toml")
    p.add_argument(
        "--netns", action="store_true", help="one network namespace per host (root)"
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for every SRV record (default 60)",
    )
    p.add_argument(
        "run", nargs=argparse.REMAINDER, metavar="-- CMD", help="run CMD once up"
    )
    add_settings_arguments(p)
    p.set_defaults(func=_cmd_up, _parser=p)
