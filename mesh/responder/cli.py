"""``mesh dns``: run the bundled responder until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import Any

from mesh.config import Settings
from mesh.errors import ConfigError
from mesh.keyfile import generate_key_file, load_keyring

__all__ = ["add_commands", "responder_from_settings", "run_dns"]

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    from mesh.cli import add_settings_arguments

    parser = sub.add_parser(
        "dns",
        help="run the bundled DNS responder",
        description="Serve the zone over UDP and TCP and accept signed updates.",
    )
    parser.add_argument("--listen", help="host:port for UDP and TCP (MESH_DNS_LISTEN)")
    parser.add_argument("--zone-file", help="static records in master-file syntax")
    parser.add_argument(
        "--default-lease",
        type=float,
        help="lease for updates without a lease option, seconds (MESH_LEASE)",
    )
    parser.add_argument(
        "--min-lease", type=float, default=30.0, help="shortest lease granted (30)"
    )
    parser.add_argument(
        "--max-lease", type=float, default=86400.0, help="longest lease granted"
    )
    parser.add_argument(
        "--axfr-loopback",
        dest="axfr_loopback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow unsigned zone transfers from loopback; with "
        "--no-axfr-loopback every transfer must be TSIG-signed "
        "(MESH_AXFR_LOOPBACK, default on)",
    )
    # The older spelling of --no-axfr-loopback, kept for existing scripts.
    parser.add_argument(
        "--no-loopback-axfr",
        dest="axfr_loopback",
        action="store_const",
        const=False,
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--max-tcp",
        dest="dns_max_tcp",
        type=int,
        help="TCP clients held at once; the longest idle is closed to admit "
        "another (MESH_DNS_MAX_TCP, 128)",
    )
    parser.add_argument(
        "--tcp-idle",
        "--tcp-timeout",
        dest="dns_tcp_idle",
        type=float,
        help="close TCP clients idle this long, seconds (MESH_DNS_TCP_IDLE, 3)",
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=run_dns)


def responder_from_settings(settings: Settings, **options: Any) -> Any:
    """A :class:`Responder` for ``settings``; makes a key file when none exists."""
    from mesh.responder.server import Responder

    key_file = settings.resolved_key_file
    if not key_file.exists():
        if settings.key_file is not None:
            raise ConfigError(
                f"key file {key_file} does not exist. "
                "Create it with 'tsig-keygen' or leave --key-file unset."
            )
        generate_key_file(
            key_file, settings.key_name.rstrip("."), settings.tsig_algorithm
        )
        log.warning("no TSIG key configured: generated one in %s", key_file)
    keyring = load_keyring(key_file)
    options.setdefault("default_lease", settings.lease)
    options.setdefault("allow_loopback_axfr", settings.axfr_loopback)
    options.setdefault("max_tcp_connections", settings.dns_max_tcp)
    options.setdefault("tcp_timeout", settings.dns_tcp_idle)
    return Responder(
        zone=settings.zone,
        listen=settings.dns_listen,
        keyring=keyring,
        state_dir=settings.state_dir,
        **options,
    )


def run_dns(args: argparse.Namespace) -> int:
    from mesh.cli import settings_from_args

    settings = settings_from_args(
        args,
        dns_listen=args.listen,
        lease=args.default_lease,
        axfr_loopback=args.axfr_loopback,
        dns_max_tcp=args.dns_max_tcp,
        dns_tcp_idle=args.dns_tcp_idle,
    )
    responder = responder_from_settings(
        settings,
        zone_file=args.zone_file,
        min_lease=args.min_lease,
        max_lease=args.max_lease,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    responder.start()
    # Tests and scripts that start us with port 0 read this line.
    print(f"listening {responder.address}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        responder.stop()
        log.info("responder on %s stopped", responder.address)
    return 0
