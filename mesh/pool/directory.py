"""Where masters find each other: ``_master._tcp.<pool>.<zone>`` in DNS.

The master talks to DNS through :class:`MasterDirectory`, a two-method seam,
so tests can run masters without a DNS server and the DNS half can be swapped
(the bundled responder, BIND). :class:`DnsDirectory` is the real one, built on
``mesh.discovery``'s resolver and registrar.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mesh.errors import ServiceNotFound

if TYPE_CHECKING:
    from mesh.config import Settings

__all__ = [
    "DnsDirectory",
    "FileDirectory",
    "MasterDirectory",
    "master_service_name",
    "zmq_endpoint",
]

log = logging.getLogger(__name__)


class MasterDirectory(Protocol):
    def resolve(self, pool: str) -> list[tuple[str, str]]:
        """Every advertised master of ``pool`` as ``(host, zmq endpoint)``."""

    def register(self, pool: str, host: str, port: int) -> Callable[[], None]:
        """Advertise this host's master; returns the function that withdraws it."""


def master_service_name(pool: str, zone: str) -> str:
    zone = zone if zone.endswith(".") else zone + "."
    return f"_master._tcp.{pool}.{zone}"


def zmq_endpoint(host: str, port: int) -> str:
    """``tcp://host:port``, with brackets around an IPv6 address."""
    try:
        v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        v6 = ":" in host
    return f"tcp://[{host}]:{port}" if v6 else f"tcp://{host}:{port}"


def _host_label(host: str) -> str:
    return "h-" + host.replace(".", "-").replace(":", "-").strip("-")


class _Resolver(Protocol):
    def resolve(self, name: str) -> Sequence[Any]: ...


class _Registrar(Protocol):
    def register(
        self,
        srv_name: str,
        target: str,
        port: int,
        addresses: Sequence[str],
        priority: int = 0,
        weight: int = 1,
    ) -> Any: ...


class DnsDirectory:
    """Masters advertised as SRV records, one target name per host."""

    def __init__(self, resolver: _Resolver, registrar: _Registrar, zone: str) -> None:
        self.resolver = resolver
        self.registrar = registrar
        self.zone = zone if zone.endswith(".") else zone + "."

    @classmethod
    def from_settings(cls, settings: Settings) -> DnsDirectory:
        # Imported here so the pool core and its tests need no DNS part.
        import importlib

        import mesh.keyfile

        resolve = importlib.import_module("mesh.discovery.resolve")
        register = importlib.import_module("mesh.discovery.register")
        key = mesh.keyfile.load_key(settings.resolved_key_file)
        resolver = resolve.Resolver(
            settings.nameservers, timeout=settings.dns_timeout, zone=settings.zone
        )
        registrar = register.Registrar(
            settings.nameservers, settings.zone, key, lease=settings.lease
        )
        return cls(resolver, registrar, settings.zone)

    def resolve(self, pool: str) -> list[tuple[str, str]]:
        try:
            targets = self.resolver.resolve(master_service_name(pool, self.zone))
        except ServiceNotFound:
            return []
        return [(str(t.host), zmq_endpoint(str(t.host), int(t.port))) for t in targets]

    def register(self, pool: str, host: str, port: int) -> Callable[[], None]:
        target = f"{_host_label(host)}.{pool}.{self.zone}"
        registration = self.registrar.register(
            master_service_name(pool, self.zone), target, port, [host]
        )

        def withdraw() -> None:
            registration.close()

        return withdraw


class FileDirectory:
    """Masters advertised as files in one shared directory.

    For machines without a DNS server and for tests that run several "hosts"
    on one machine; every host must see the same directory.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def resolve(self, pool: str) -> list[tuple[str, str]]:
        found = []
        for entry in sorted((self.path / pool).glob("*.json")):
            try:
                data = json.loads(entry.read_text())
                found.append((str(data["host"]), str(data["endpoint"])))
            except (OSError, ValueError, KeyError):
                continue
        return found

    def register(self, pool: str, host: str, port: int) -> Callable[[], None]:
        folder = self.path / pool
        folder.mkdir(parents=True, exist_ok=True)
        entry = folder / f"{_host_label(host)}.json"
        text = json.dumps({"host": host, "endpoint": zmq_endpoint(host, port)})
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, entry)

        def withdraw() -> None:
            try:
                if entry.read_text() == text:
                    entry.unlink()
            except FileNotFoundError:
                pass

        return withdraw
