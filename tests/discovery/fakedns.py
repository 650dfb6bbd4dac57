"""Fabricated DNS replies and a scripted resolver, for tests without sockets,
and a scripted nameserver on loopback for the few tests that need real UDP."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Callable
from types import TracebackType

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig

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


# Given the parsed request (a query or an UPDATE), returns the reply to send
# or None to stay silent.
Handler = Callable[[dns.message.Message], "dns.message.Message | None"]


class LoopbackNameserver:
    """A UDP nameserver on 127.0.0.1 that answers by ``handler``; a context manager.

    ``requests`` lists every parsed request in arrival order, so a test can
    count attempts. With a ``keyring``, signed requests are verified and
    ``dns.message.make_response`` signs the replies to them, as a real
    server would; without one, signatures are ignored.
    """

    def __init__(
        self,
        handler: Handler,
        keyring: dict[dns.name.Name, dns.tsig.Key] | None = None,
    ) -> None:
        self.handler = handler
        self.keyring = keyring
        self.requests: list[dns.message.Message] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        # Bounds each receive, so the thread notices the stop event.
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    def __enter__(self) -> LoopbackNameserver:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            keyring = self.keyring if self.keyring is not None else False
            request = dns.message.from_wire(data, keyring=keyring)
            self.requests.append(request)
            response = self.handler(request)
            if response is not None:
                self._sock.sendto(response.to_wire(), peer)


def servfail_then(handler: Handler, failures: int = 1) -> tuple[Handler, list[int]]:
    """A handler answering SERVFAIL to the first ``failures`` requests.

    Returns it with a one-item list counting every request seen.
    """
    seen = [0]

    def handle(request: dns.message.Message) -> dns.message.Message | None:
        seen[0] += 1
        if seen[0] <= failures:
            response = dns.message.make_response(request)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        return handler(request)

    return handle, seen
