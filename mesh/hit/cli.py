"""``mesh serve``: run a Hit handler on one port and register it in DNS.

Signals: SIGTERM (or a first SIGINT) drains: the SRV record is withdrawn
first, new opens get BUSY, open Hits may finish for ``--drain-timeout``
seconds. A second SIGINT or SIGTERM stops at once; the record is withdrawn
either way.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import signal
import socket
from collections.abc import Callable
from types import FrameType, ModuleType
from typing import Any

from mesh.config import Settings
from mesh.curve import Curve
from mesh.errors import ConfigError
from mesh.hit.server import HitServer, Registrar

__all__ = ["add_commands", "host_label", "load_handler"]

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    from mesh.cli import add_settings_arguments

    serve = sub.add_parser(
        "serve",
        help="serve Hits with a handler class and register the service in DNS",
        description="Serve Hits: each Hit gets one thread running one handler "
        "object, created with the client's metadata dict.",
    )
    serve.add_argument(
        "handler", help="module:Class (or any callable) to create per Hit"
    )
    serve.add_argument(
        "--service", required=True, help="service name: _NAME._tcp.<zone>"
    )
    serve.add_argument(
        "--bind", default="127.0.0.1", help="address to bind (default 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=int, default=0, help="port to bind (default: ephemeral)"
    )
    serve.add_argument(
        "--advertise",
        help="comma-separated addresses to publish as A/AAAA (default: the bind address)",
    )
    serve.add_argument(
        "--host-name", help="target label in the zone (default: this host's name)"
    )
    serve.add_argument(
        "--priority", type=int, default=0, help="SRV priority (default 0)"
    )
    serve.add_argument("--weight", type=int, default=1, help="SRV weight (default 1)")
    serve.add_argument(
        "--max-hits", type=int, help="concurrent Hit cap (MESH_MAX_HITS)"
    )
    serve.add_argument(
        "--idle-timeout", type=float, help="reap Hits idle this long (s)"
    )
    serve.add_argument(
        "--drain-timeout", type=float, help="SIGTERM grace for open Hits (s)"
    )
    serve.add_argument("--max-message-size", type=int, help="largest message in bytes")
    serve.add_argument(
        "--max-frames", type=int, help="most frames in one message (MESH_MAX_FRAMES)"
    )
    serve.add_argument(
        "--pool",
        help="also join this pool; the handler module's "
        "on_broadcast(payload) answers broadcasts",
    )
    serve.add_argument(
        "--no-register",
        action="store_true",
        help="do not touch DNS (tests, static zones)",
    )
    add_settings_arguments(serve)
    serve.set_defaults(func=_serve)


def load_handler(spec: str) -> tuple[Callable[[dict[str, Any]], Any], ModuleType]:
    """``module:Name`` -> the named callable and its module."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"handler {spec!r} is not 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{module_name} has no callable {attr!r}")
    return factory, module


def host_label(name: str | None = None) -> str:
    """A DNS label for this host: lower case, letters, digits and hyphens."""
    raw = (name or socket.gethostname()).split(".")[0].lower()
    label = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")[:63]
    return label or "host"


def make_registrar(settings: Settings) -> Registrar:
    """A registrar for the configured zone, signing with the TSIG key file."""
    from mesh.keyfile import load_key

    # Imported by name: the hit part must not fail to import without it.
    register = importlib.import_module("mesh.discovery.register")
    key = load_key(settings.resolved_key_file)
    registrar: Registrar = register.Registrar(
        settings.nameservers, settings.zone, key, lease=settings.lease
    )
    return registrar


def _serve(args: argparse.Namespace) -> int:
    from mesh.cli import settings_from_args
    from mesh.discovery.names import absolute_name, service_name

    settings = settings_from_args(
        args,
        max_hits=args.max_hits,
        idle_timeout=args.idle_timeout,
        drain_timeout=args.drain_timeout,
        max_message_size=args.max_message_size,
        max_frames=args.max_frames,
    )
    factory, module = load_handler(args.handler)
    advertise = [
        a.strip() for a in (args.advertise or args.bind).split(",") if a.strip()
    ]
    # Only what is published must be reachable; an unregistered server (in
    # Kubernetes, where the platform publishes the pod address) may bind the
    # wildcard and advertise nothing.
    wildcard = any(a in ("0.0.0.0", "::") for a in advertise)
    if wildcard and (not args.no_register or args.pool):
        raise ConfigError(
            f"cannot advertise the wildcard address {args.bind}. "
            "Give --advertise with the address clients should use."
        )
    srv_name = str(service_name(args.service, settings.zone))
    target = str(absolute_name(host_label(args.host_name), settings.zone))
    registrar = None if args.no_register else make_registrar(settings)
    server = HitServer(
        factory,
        args.bind,
        args.port,
        max_hits=settings.max_hits,
        idle_timeout=settings.idle_timeout,
        max_message_size=settings.max_message_size,
        max_frames=settings.max_frames,
        drain_timeout=settings.drain_timeout,
        registrar=registrar,
        srv_name=srv_name,
        target=target,
        advertise=advertise,
        priority=args.priority,
        weight=args.weight,
        curve=Curve.from_settings(settings),
    )
    signals = {"count": 0}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("%s: draining", signal.Signals(signum).name)
            server.drain()
        else:
            log.info("%s again: stopping now", signal.Signals(signum).name)
            server.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    member = None
    try:
        server.start()
        # The one line scripts and tests read to find an ephemeral port.
        print(f"mesh serve: {srv_name} on {server.endpoint}", flush=True)
        if args.pool:
            member = _join_pool(args.pool, settings, module, advertise[0])
        while not server.wait(0.2):
            pass
    finally:
        if member is not None:
            member.close()
        server.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    return 0


def _join_pool(pool: str, settings: Settings, module: ModuleType, host: str) -> Any:
    from mesh.pool.member import PoolMember

    on_broadcast = getattr(module, "on_broadcast", None)
    if on_broadcast is None:
        raise ConfigError(
            f"--pool {pool}: module {module.__name__} has no on_broadcast(payload) function"
        )
    member = PoolMember(pool, settings, on_broadcast, host)
    member.start()
    return member
