"""DNS names for srvmesh services, made absolute the one way everyone uses.

A service ``orders`` in zone ``mesh.internal.`` lives at
``_orders._tcp.mesh.internal.`` (RFC 2782 with RFC 6335 service labels), and
a pool's masters at ``_master._tcp.<pool>.<zone>``. Names are always made
absolute here, before any query, so that no search domain is ever appended
(C13).
"""

from __future__ import annotations

import dns.name

__all__ = ["absolute_name", "master_name", "service_name"]


def absolute_name(
    name: str | dns.name.Name, zone: str | dns.name.Name
) -> dns.name.Name:
    """``name`` as an absolute name, taken relative to ``zone`` if it is not in it.

    ``"_svc._tcp"``, ``"_svc._tcp.mesh.internal"`` and
    ``"_svc._tcp.mesh.internal."`` all give ``_svc._tcp.mesh.internal.``: a
    name already inside the zone is not given the zone a second time.
    """
    origin = zone if isinstance(zone, dns.name.Name) else dns.name.from_text(zone)
    if isinstance(name, dns.name.Name):
        if name.is_absolute():
            return name
        return name.derelativize(origin)
    if name.endswith("."):
        return dns.name.from_text(name)
    as_given = dns.name.from_text(name)
    if as_given.is_subdomain(origin):
        return as_given
    return dns.name.from_text(name, origin=origin)


def service_name(
    service: str, zone: str | dns.name.Name, protocol: str = "tcp"
) -> dns.name.Name:
    """``_<service>._<protocol>.<zone>``; a leading underscore may be given."""
    label = service if service.startswith("_") else "_" + service
    return absolute_name(f"{label}._{protocol}", zone)


def master_name(pool: str, zone: str | dns.name.Name) -> dns.name.Name:
    """``_master._tcp.<pool>.<zone>``: where a pool's host masters register."""
    return absolute_name(f"_master._tcp.{pool}", zone)
