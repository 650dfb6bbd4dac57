"""CurveZMQ on the Hit and pool sockets, authenticated through ``zmq.auth``.

Keys are the certificate files pyzmq's ``zmq.auth`` reads and writes:
``NAME.key`` holds a public key, ``NAME.key_secret`` the pair (``mesh keys
new NAME`` makes both, the secret one mode 0600). Three settings turn Curve
on and say who is who:

- ``curve_secret_key``: this process's ``.key_secret``. Setting it turns
  Curve on for every socket the process binds or connects.
- ``curve_allow_dir``: a directory of ``.key`` files; a listening socket
  accepts only clients whose public key is there. Files added or removed
  take effect for the next connection, without a restart.
- ``curve_server_key``: the ``.key`` of the servers this process connects
  to. Servers and masters of a mesh share one keypair, so a server needs
  only its own secret file (the default is this process's own public key)
  and a client names the servers' public file.

No byte of crypto is ours: libzmq does CurveZMQ, pyzmq's ZAP authenticator
runs the allow-list check, and this module only wires them to settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from mesh.config import Settings
from mesh.errors import ConfigError

__all__ = [
    "Curve",
    "MeshKeys",
    "allow_key",
    "ServerAuth",
    "add_commands",
    "ensure_mesh_keys",
    "new_keypair",
    "warn_if_exposed",
]

log = logging.getLogger(__name__)

#: The ZAP domain of every srvmesh listening socket.
ZAP_DOMAIN = "srvmesh"


def _load(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        if want_secret and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"Curve secret key file {path} is readable by others. "
                f"Run 'chmod 600 {path}'."
            )
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot read Curve key file {path}: {exc.strerror}"
        ) from None
    except ValueError:
        # pyzmq's message would be fine, but the error must never carry the
        # file's contents; name the file only.
        raise ConfigError(f"{path} is not a zmq.auth certificate file") from None
    if want_secret and not secret:
        raise ConfigError(
            f"{path} holds no secret key; give the .key_secret file, not the .key"
        )
    return public, secret


@dataclasses.dataclass(frozen=True, repr=False)
class Curve:
    """This process's Curve identity and whom it trusts."""

    public: bytes
    secret: bytes
    server_public: bytes
    allow_dir: Path | None = None
    #: True when curve_server_key was given, False when it defaulted to ours.
    server_key_given: bool = False

    def __repr__(self) -> str:
        # The secret stays out of every repr, log line and traceback.
        return f"Curve(public={self.public.decode()!r}, allow_dir={self.allow_dir})"

    @classmethod
    def from_settings(cls, settings: Settings) -> Curve | None:
        """The configured identity, or ``None`` when Curve is off."""
        if settings.curve_secret_key is None:
            for name in ("curve_allow_dir", "curve_server_key"):
                if getattr(settings, name) is not None:
                    raise ConfigError(
                        f"{name} is set but curve_secret_key is not; "
                        "Curve needs this process's own key (MESH_CURVE_SECRET_KEY)"
                    )
            return None
        public, secret = _load(settings.curve_secret_key, want_secret=True)
        assert secret is not None
        server_public = public
        if settings.curve_server_key is not None:
            server_public, _ = _load(settings.curve_server_key, want_secret=False)
        allow_dir = settings.curve_allow_dir
        if allow_dir is not None and not allow_dir.is_dir():
            raise ConfigError(f"Curve allow-list directory {allow_dir} does not exist")
        return cls(
            public,
            secret,
            server_public,
            allow_dir,
            settings.curve_server_key is not None,
        )

    def allow_list(self) -> Path:
        """The allow-list directory; a :class:`ConfigError` when there is none."""
        if self.allow_dir is None:
            raise ConfigError(
                "Curve is on but no allow-list is set: a listening socket needs "
                "curve_allow_dir (MESH_CURVE_ALLOW_DIR)"
            )
        return self.allow_dir

    def client(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a Curve client of the mesh's servers (before connect)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def server(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a Curve server (before bind).

        Its context must run a :class:`ServerAuth`: without a ZAP handler
        libzmq would accept any client key.
        """
        self.allow_list()
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())


class _AllowList:
    """The ZAP callback: is this client key in the allow-list directory?

    Each handshake looks at the name, size, mtime and inode of every ``.key``
    file, and the keys are read again when any of them changed, so a key
    added, removed or overwritten takes effect for the next connection.
    A file that cannot be read as a certificate is skipped with a warning;
    nothing here may raise, since an exception would end pyzmq's ZAP thread
    and, with it, every later handshake.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[str, int, int, int], ...] | None = None
        self._keys: frozenset[bytes] = frozenset()

    def _scan(self) -> tuple[tuple[str, int, int, int], ...]:
        entries = []
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.endswith(".key") and entry.is_file():
                    st = entry.stat()
                    entries.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(sorted(entries))

    def _load(self, names: list[str]) -> frozenset[bytes]:
        keys = set()
        for name in names:
            try:
                public, _ = zmq.auth.load_certificate(self.directory / name)
            except (OSError, ValueError) as exc:
                log.warning(
                    "skipping %s in the Curve allow-list: not a public key file (%s)",
                    name,
                    type(exc).__name__,
                )
                continue
            keys.add(public)
        return frozenset(keys)

    def _current(self) -> frozenset[bytes]:
        try:
            stamp = self._scan()
        except OSError as exc:
            log.warning("Curve allow-list %s unreadable: %s", self.directory, exc)
            return frozenset()
        with self._lock:
            if stamp != self._stamp:
                self._keys = self._load([name for name, *_ in stamp])
                self._stamp = stamp
                log.debug(
                    "Curve allow-list %s: %d keys", self.directory, len(self._keys)
                )
            return self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            allowed = key in self._current()
        except Exception:
            log.exception("Curve allow-list check failed; refusing the client")
            return False
        if not allowed:
            log.debug(
                "refused a Curve client with key %s (not in %s)",
                key.decode(),
                self.directory,
            )
        return allowed


class ServerAuth:
    """pyzmq's ZAP authenticator on one context, checking the allow-list.

    Start it before binding a Curve server socket on ``context`` and stop it
    before terminating the context (its thread owns a socket there).
    """

    def __init__(self, context: zmq.Context[Any], curve: Curve) -> None:
        allow_dir = curve.allow_list()
        self._auth = ThreadAuthenticator(
            context, log=logging.getLogger("mesh.curve.zap")
        )
        self._allow = _AllowList(allow_dir)

    def start(self) -> ServerAuth:
        self._auth.start()
        self._auth.configure_curve_callback(
            ZAP_DOMAIN, credentials_provider=self._allow
        )
        return self

    def stop(self) -> None:
        self._auth.stop()


def new_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (0600) into ``directory``.

    Refuses to overwrite either file. ``zmq.auth`` writes with the process
    umask, so the pair is made in a private temporary directory first and
    only then moved into place, already private.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_path = directory / f"{name}.key"
    secret_path = directory / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise ConfigError(f"{path} exists; remove it first to make a new key")
    with tempfile.TemporaryDirectory(dir=directory, prefix=".keys-") as scratch:
        public, secret = zmq.auth.create_certificates(scratch, name)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        shutil.move(secret, secret_path)
        shutil.move(public, public_path)
    log.info("wrote Curve keypair %s in %s", name, directory)
    return public_path, secret_path


def allow_key(public: Path, allow_dir: Path) -> Path:
    """Copy a public key file into an allow-list directory, atomically.

    A running server reads the directory at every handshake; it must never
    see half a file.
    """
    allow_dir.mkdir(parents=True, exist_ok=True)
    target = allow_dir / public.name
    with tempfile.NamedTemporaryFile(
        "wb", dir=allow_dir, prefix=".", suffix=".tmp", delete=False
    ) as tmp:
        tmp.write(public.read_bytes())
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, target)
    return target


@dataclasses.dataclass(frozen=True)
class MeshKeys:
    """The keys `mesh up` runs a local mesh with.

    One pair, ``server``, for every server, master and the tools that may act
    as a master (``mesh broadcast``, the workload's stats broadcast), and an
    allow-list holding its public key. A client with a pair of its own is
    added with ``mesh keys new NAME --allow-dir <allow>``.
    """

    directory: Path

    @property
    def allow_dir(self) -> Path:
        return self.directory / "allow"

    def env(self) -> dict[str, str]:
        """The ``MESH_CURVE_*`` settings of a process of the local mesh."""
        return {
            "MESH_CURVE_SECRET_KEY": str(self.directory / "server.key_secret"),
            "MESH_CURVE_ALLOW_DIR": str(self.allow_dir),
            # The default, said aloud: a user who swaps in a client pair of
            # their own keeps the right server key.
            "MESH_CURVE_SERVER_KEY": str(self.directory / "server.key"),
        }


def ensure_mesh_keys(directory: str | os.PathLike[str]) -> MeshKeys:
    """Make the ``server`` pair and its allow-list unless they exist.

    Existing files are kept, so a restarted mesh keeps its keys and a user
    may put a pair of their own there instead.
    """
    keys = MeshKeys(Path(directory))
    keys.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys.allow_dir.mkdir(exist_ok=True)
    public = keys.directory / "server.key"
    if not public.exists():
        new_keypair(keys.directory, "server")
    allowed = keys.allow_dir / public.name
    if not allowed.exists():
        allow_key(public, keys.allow_dir)
    return keys


def warn_if_exposed(address: str, curve: Curve | None, what: str) -> None:
    """Log a warning when ``address`` is not loopback and Curve is off."""
    if curve is not None:
        return
    host = address.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning(
            "%s listens on %s without Curve: anyone who can reach it can use it "
            "(set MESH_CURVE_SECRET_KEY and MESH_CURVE_ALLOW_DIR)",
            what,
            address,
        )


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    keys = sub.add_parser(
        "keys",
        help="make Curve keypairs for the Hit and pool sockets",
        description="Curve keys in the zmq.auth certificate format.",
    )
    verbs = keys.add_subparsers(dest="verb", metavar="VERB", required=True)
    new = verbs.add_parser(
        "new",
        help="write NAME.key (public) and NAME.key_secret (0600)",
        description="Write a new keypair. Copy NAME.key into the allow-list "
        "directory of every server that should accept it.",
    )
    new.add_argument("name", help="file name stem, for example 'server' or 'web-1'")
    new.add_argument(
        "--dir", default=".", help="where to write the pair (default: here)"
    )
    new.add_argument(
        "--allow-dir", help="also copy NAME.key into this allow-list directory"
    )
    new.set_defaults(func=_keys_new)


def _keys_new(args: argparse.Namespace) -> int:
    public, secret = new_keypair(args.dir, args.name)
    print(f"public key: {public}")
    print(f"secret key: {secret}")
    if args.allow_dir:
        print(f"allowed:    {allow_key(public, Path(args.allow_dir))}")
    return 0
