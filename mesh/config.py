"""One settings object for every part of srvmesh.

Values come from, in rising order of precedence: the defaults below, a TOML
file (``MESH_CONFIG`` or ``--config``), ``MESH_*`` environment variables, and
explicit overrides (command-line flags). Each field's environment variable is
``MESH_`` plus its name in upper case.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError

__all__ = [
    "Settings",
    "default_runtime_dir",
    "default_state_dir",
    "format_hostport",
    "parse_hostport",
]


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "srvmesh"


def default_runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "srvmesh"
    # A per-user directory, so two users on one host never share election locks.
    return Path(tempfile.gettempdir()) / f"srvmesh-{os.getuid()}"


def parse_hostport(text: str, default_port: int = 53) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port``, a bare IPv4/IPv6 address or a host.

    >>> parse_hostport("127.0.0.1:5353")
    ('127.0.0.1', 5353)
    >>> parse_hostport("[::1]:5353")
    ('::1', 5353)
    """
    text = text.strip()
    if not text:
        raise ConfigError("empty host:port")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"unclosed '[' in {text!r}")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ConfigError(f"junk after ']' in {text!r}")
    elif text.count(":") > 1:
        # A bare IPv6 address: there is no way to carry a port without brackets.
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"port {port_text!r} in {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} in {text!r} is out of range")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport`; IPv6 addresses get brackets."""
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = ":" in host
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"


@dataclasses.dataclass
class Settings:
    """Every setting shared between parts; see ``ARCHITECTURE.md`` for names."""

    zone: str = "mesh.internal."
    nameservers: list[str] = dataclasses.field(
        default_factory=lambda: ["127.0.0.1:5353"]
    )
    dns_listen: str = "127.0.0.1:5353"
    key_file: Path | None = None
    key_name: str = "srvmesh-key."
    tsig_algorithm: str = "hmac-sha256"
    state_dir: Path = dataclasses.field(default_factory=default_state_dir)
    runtime_dir: Path = dataclasses.field(default_factory=default_runtime_dir)
    config: Path | None = None

    # The bundled responder (mesh dns). Unsigned AXFR (what mesh ls and
    # mesh status use) is allowed from loopback unless axfr_loopback is off;
    # from anywhere else, or with it off, a transfer must be TSIG-signed.
    axfr_loopback: bool = True
    # TCP clients held at once (the longest-idle one is closed to admit a new
    # one) and seconds a TCP client may stay silent before it is closed (C16).
    dns_max_tcp: int = 128
    dns_tcp_idle: float = 3.0
    # DNS registration and resolution
    lease: float = 30.0
    srv_ttl: int = 5
    dns_timeout: float = 2.0
    stale_grace: float = 60.0

    # Hits
    max_hits: int = 256
    max_message_size: int = 2 * 1024**3
    # Frames per message, header included: far more than any real call needs,
    # few enough that a peer cannot make us hold millions of frame objects.
    max_frames: int = 1024
    open_timeout: float = 2.0
    call_timeout: float = 30.0
    idle_timeout: float = 300.0
    drain_timeout: float = 10.0

    # Pools
    heartbeat_interval: float = 0.25
    heartbeat_liveness: int = 4
    kill_hung_master: bool = True
    # Members one master takes, and broadcasts outstanding at once on one
    # member and on one master. Beyond them a join or a broadcast is refused
    # with a clear error, rather than growing the master's state unboundedly.
    max_pool_members: int = 1024
    max_pending_broadcasts: int = 256

    # Curve (see mesh.curve): our .key_secret turns it on; listening sockets
    # accept the keys in the allow-list directory; clients trust the servers'
    # public key (default: our own, as servers of a mesh share one pair).
    curve_secret_key: Path | None = None
    curve_allow_dir: Path | None = None
    curve_server_key: Path | None = None

    def __post_init__(self) -> None:
        if not self.zone.endswith("."):
            self.zone += "."
        for ns in self.nameservers:
            parse_hostport(ns)
        parse_hostport(self.dns_listen)
        if self.dns_max_tcp < 1:
            raise ConfigError(
                f"dns_max_tcp={self.dns_max_tcp}: at least one TCP client "
                "must be allowed."
            )
        if not self.dns_tcp_idle > 0:
            raise ConfigError(
                f"dns_tcp_idle={self.dns_tcp_idle}: give a positive number of seconds."
            )

    @property
    def resolved_key_file(self) -> Path:
        """The TSIG key file: the configured one, else one in the state dir."""
        return self.key_file or self.state_dir / "tsig.key"

    @classmethod
    def load(
        cls,
        config_file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Build settings from defaults, a TOML file, ``MESH_*`` and overrides.

        Overrides whose value is ``None`` are ignored, so argparse namespaces
        can be passed through as they are.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or env.get("MESH_CONFIG")
        if path:
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(
                    f"config file {path} is not valid TOML: {exc}"
                ) from exc
            values.update(data.get("mesh", data))
            values["config"] = Path(path)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields:
            raw = env.get("MESH_" + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(unknown)}")
        converted = {
            name: _convert(fields[name], value) for name, value in values.items()
        }
        return cls(**converted)


def _convert(field: dataclasses.Field[Any], value: Any) -> Any:
    kind = str(field.type)
    try:
        if kind.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return list(value)
        if "Path" in kind:
            return Path(value).expanduser() if value not in (None, "") else None
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"not a boolean: {value!r}")
            return bool(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {field.name}={value!r}: {exc}") from None
