"""Everything a client or server does with DNS: resolve and register.

``Resolver``/``AsyncResolver`` (``mesh.discovery.resolve``) turn an SRV name
into targets in RFC 2782 order; ``Registrar`` (``mesh.discovery.register``)
adds a server's records and keeps their lease alive.
"""

from mesh.discovery.names import absolute_name, master_name, service_name
from mesh.discovery.register import Registrar, Registration
from mesh.discovery.resolve import AsyncResolver, Resolver, Target

__all__ = [
    "AsyncResolver",
    "Registrar",
    "Registration",
    "Resolver",
    "Target",
    "absolute_name",
    "master_name",
    "service_name",
]
