"""Fabricated DNS replies and a scripted resolver, for tests without sockets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from mesh.discovery import resolve

SOA = "ns.mesh.internal. admin.mesh.internal. 1 60 60 600 2"
ZONE = dns.name.from_text("mesh.internal.")


def reply(
    qname: str,
    rdtype: str,
    answer: list[tuple[str, str, int, list[str]]] = (),  # type: ignore[assignment]
    additional: list[tuple[str, str, int, list[str]]] = (),  # type: ignore[assignment]
    rcode: int = dns.rcode.NOERROR,
    soa: bool = True,
) -> dns.message.Message:
    """A response to ``qname``/``rdtype``; sections as (name, type, ttl, rdatas)."""
    query = dns.message.make_query(qname, rdtype)
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    for name, kind, ttl, texts in answer:
        _add(response, response.answer, name, kind, ttl, texts)
    for name, kind, ttl, texts in additional:
        _add(response, response.additional, name, kind, ttl, texts)
    if not answer and soa:
        _add(response, response.authority, ZONE.to_text(), "SOA", 60, [SOA])
    return response


def _add(
    message: dns.message.Message,
    section: list[dns.rrset.RRset],
    name: str,
    kind: str,
    ttl: int,
    texts: list[str],
) -> None:
    # Through find_rrset, so the message's own index sees the RRset the way
    # it does for a parsed reply.
    rrset = dns.rrset.from_text_list(name, ttl, "IN", kind, texts)
    target = message.find_rrset(
        section, rrset.name, rrset.rdclass, rrset.rdtype, create=True
    )
    target.update(rrset)


Script = Callable[[dns.name.Name, dns.rdatatype.RdataType], "resolve._Reply"]


@dataclasses.dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def scripted_resolver(
    script: Script, clock: Clock, **kwargs: object
) -> tuple[resolve.Resolver, list[tuple[str, str]]]:
    """A Resolver whose queries are answered by ``script``; returns the log too."""
    resolver = resolve.Resolver(["127.0.0.1:5353"], clock=clock, **kwargs)  # type: ignore[arg-type]
    asked: list[tuple[str, str]] = []

    def ask(question: resolve._Question, deadline: float) -> resolve._Reply:
        qname, rdtype = question
        asked.append((qname.to_text(), dns.rdatatype.to_text(rdtype)))
        return script(qname, rdtype)

    resolver._ask = ask  # type: ignore[method-assign]
    return resolver, asked


def failure(server_failure: bool = False) -> resolve._Failure:
    what = "answered SERVFAIL" if server_failure else "no answer in 2.00 s"
    return resolve._Failure([("127.0.0.1:5353", what)], server_failure)
