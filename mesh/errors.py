"""Every error srvmesh raises, under one root.

::

    MeshError
    ├── ConfigError                 a setting, manifest or key file is unusable
    ├── DiscoveryError              asking DNS for a service went wrong
    │   ├── ServiceNotFound         the name does not hold the service
    │   │   ├── NameNotFound        NXDOMAIN: the name does not exist
    │   │   └── NoServiceRecords    NODATA: the name exists, no SRV records
    │   ├── ServiceNotAvailable     a lone "." target: deliberately not offered
    │   └── DiscoveryUnavailable    no nameserver gave a usable answer
    │       ├── DiscoveryTimeout    every nameserver stayed silent
    │       └── DiscoveryServerFailure  SERVFAIL (or REFUSED) from every one
    ├── RegistrationError           a registration could not be made
    │   └── RegistrationRejected    the DNS server refused it (rcode, TSIG error)
    ├── HitError                    a Hit could not be opened or went wrong
    │   ├── NoTargetAvailable       every SRV target refused, was busy or silent
    │   ├── HitLost                 the server side of an open Hit is gone
    │   │   └── HitTimeout          a call got no reply in time
    │   ├── RemoteError             the handler raised; the Hit stays usable
    │   ├── HitClosed               the Hit was used after it ended
    │   ├── WrongThread             the Hit was used outside its owner thread
    │   └── MessageTooLarge         a payload exceeds the configured maximum
    ├── ProtocolError               a peer sent frames we cannot accept
    └── PoolError                   a pool broadcast could not be run
        ├── MasterUnavailable       no usable master on this host
        └── BroadcastRejected       the pool refused the broadcast

Errors carry their facts as attributes as well as in the message, so callers
can act on them without parsing text.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BroadcastRejected",
    "ConfigError",
    "DiscoveryError",
    "DiscoveryServerFailure",
    "DiscoveryTimeout",
    "DiscoveryUnavailable",
    "HitClosed",
    "HitError",
    "HitLost",
    "HitTimeout",
    "MasterUnavailable",
    "MeshError",
    "MessageTooLarge",
    "NameNotFound",
    "NoServiceRecords",
    "NoTargetAvailable",
    "PoolError",
    "ProtocolError",
    "RegistrationError",
    "RegistrationRejected",
    "RemoteError",
    "ServiceNotAvailable",
    "ServiceNotFound",
    "WrongThread",
]


class MeshError(Exception):
    """Root of every error srvmesh raises on purpose."""


class ConfigError(MeshError):
    """A setting, manifest or key file cannot be used."""


class DiscoveryError(MeshError):
    """Looking a service up in DNS failed.

    ``name`` is the SRV name asked for and ``nameservers`` the ``host:port``
    strings that were asked.
    """

    def __init__(self, message: str, name: str, nameservers: Sequence[str]) -> None:
        super().__init__(message)
        self.name = name
        self.nameservers = list(nameservers)


class ServiceNotFound(DiscoveryError):
    """The SRV name holds no service (NXDOMAIN or NODATA)."""


class NameNotFound(ServiceNotFound):
    """NXDOMAIN: the SRV name does not exist."""


class NoServiceRecords(ServiceNotFound):
    """NODATA: the name exists but holds no SRV records."""


class ServiceNotAvailable(DiscoveryError):
    """The SRV RRset is a lone "." target: RFC 2782 says not offered here."""


class DiscoveryUnavailable(DiscoveryError):
    """No nameserver gave a usable answer; worth retrying later."""


class DiscoveryTimeout(DiscoveryUnavailable):
    """Every nameserver asked stayed silent within the lifetime."""


class DiscoveryServerFailure(DiscoveryUnavailable):
    """Every nameserver asked answered SERVFAIL or REFUSED."""


class RegistrationError(MeshError):
    """A registration, renewal or removal could not be made."""


class RegistrationRejected(RegistrationError):
    """The DNS server refused the UPDATE.

    ``rcode`` is the DNS rcode text (``NOTAUTH``, ``REFUSED`` ...) and
    ``tsig_error`` the TSIG error text (``BADSIG``, ``BADKEY``, ``BADTIME``)
    or ``None``.
    """

    def __init__(self, message: str, rcode: str, tsig_error: str | None = None) -> None:
        super().__init__(message)
        self.rcode = rcode
        self.tsig_error = tsig_error


class HitError(MeshError):
    """A Hit could not be opened, or failed while open."""


class NoTargetAvailable(HitError):
    """No SRV target accepted the Hit.

    ``attempts`` lists ``(target, what happened)`` for each target tried.
    """

    def __init__(self, message: str, attempts: Sequence[tuple[str, str]]) -> None:
        super().__init__(message)
        self.attempts = list(attempts)


class HitLost(HitError):
    """The server side of an open Hit is gone; its state cannot be recovered.

    Nothing is replayed elsewhere: the caller decides whether to open a new Hit.
    """


class HitTimeout(HitLost):
    """A call of an open Hit got no reply before its deadline."""


class RemoteError(HitError):
    """The Hit handler raised; the Hit itself stays open and usable.

    ``type_name`` is the exception's class name on the server and
    ``remote_message`` its message.
    """

    def __init__(self, type_name: str, remote_message: str) -> None:
        super().__init__(f"{type_name}: {remote_message}")
        self.type_name = type_name
        self.remote_message = remote_message


class HitClosed(HitError):
    """The Hit was used after it was closed or lost."""


class WrongThread(HitError):
    """A Hit was used from a thread or task other than the one that opened it."""


class MessageTooLarge(HitError):
    """A message is larger than the configured maximum; nothing was sent."""

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class ProtocolError(MeshError):
    """A peer sent frames that do not follow the srvmesh protocol."""


class PoolError(MeshError):
    """A pool operation could not be carried out."""


class MasterUnavailable(PoolError):
    """No usable master on this host (none elected, or it is hung)."""


class BroadcastRejected(PoolError):
    """The pool refused to start the broadcast (limits, shutdown)."""
