"""Registrar messages and reply judgement, without sockets (C19)."""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
from typing import Any

import dns.edns
import dns.message
import dns.name
import dns.rcode
import dns.tsig
import dns.update
import pytest

from mesh.discovery import register
from mesh.errors import RegistrationError, RegistrationRejected

ZONE = dns.name.from_text("mesh.internal.")
KEY = dns.tsig.Key("srvmesh-key.", b"k" * 32, dns.tsig.HMAC_SHA256)
RECORD = register.Record(
    dns.name.from_text("_svc._tcp.mesh.internal."),
    dns.name.from_text("host-a.mesh.internal."),
    5000,
    ("127.0.0.2", "::1"),
    priority=1,
    weight=7,
    ttl=5,
)


def _sent(message: dns.message.Message) -> dns.message.Message:
    message.to_wire()  # signs it, fixing its MAC and time
    return message


def test_add_carries_records_lease_and_explicit_hmac_sha256() -> None:
    update = _sent(register.build_add(ZONE, KEY, RECORD, lease=30))
    parsed = dns.message.from_wire(update.to_wire(), keyring={KEY.name: KEY})
    assert isinstance(parsed, dns.update.UpdateMessage)
    texts = sorted(rrset.to_text() for rrset in parsed.update)
    assert texts == [
        "_svc._tcp.mesh.internal. 5 IN SRV 1 7 5000 host-a.mesh.internal.",
        "host-a.mesh.internal. 5 IN A 127.0.0.2",
        "host-a.mesh.internal. 5 IN AAAA ::1",
    ]
    assert parsed.keyalgorithm == dns.tsig.HMAC_SHA256
    (option,) = [o for o in parsed.options if o.otype == 2]
    assert isinstance(option, dns.edns.GenericOption)
    assert struct.unpack("!I", option.data) == (30,)


def test_delete_names_each_record_by_value() -> None:
    update = register.build_delete(ZONE, KEY, RECORD, ["::1"])
    texts = sorted(rrset.to_text() for rrset in update.update)
    assert texts == [
        "_svc._tcp.mesh.internal. 0 NONE SRV 1 7 5000 host-a.mesh.internal.",
        "host-a.mesh.internal. 0 NONE AAAA ::1",
    ]


def _reply(
    query: dns.message.Message,
    rcode: int = dns.rcode.NOERROR,
    tsig_error: int = 0,
    other: bytes = b"",
    lease: int | None = None,
) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if lease is not None:
        option = dns.edns.GenericOption(2, struct.pack("!I", lease))  # type: ignore[arg-type]
        response.use_edns(0, options=[option])
    response.use_tsig(KEY, tsig_error=tsig_error, other_data=other)
    return response.to_wire()


def test_read_reply_accepts_with_the_granted_lease() -> None:
    query = _sent(register.build_add(ZONE, KEY, RECORD, lease=30))
    assert register.read_reply(query, _reply(query, lease=60)) == register.Accepted(60)
    query = _sent(register.build_add(ZONE, KEY, RECORD, lease=30))
    assert register.read_reply(query, _reply(query)) == register.Accepted(None)


def test_read_reply_rejects_auth_failures_and_retries_transients(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def judge(**kwargs: Any) -> register.Verdict:
        query = _sent(register.build_add(ZONE, KEY, RECORD, lease=30))
        return register.read_reply(query, _reply(query, **kwargs))

    bad_sig = judge(rcode=dns.rcode.NOTAUTH, tsig_error=dns.rcode.BADSIG)
    assert isinstance(bad_sig, register.Rejected)
    assert (bad_sig.rcode, bad_sig.tsig_error) == ("NOTAUTH", "BADSIG")
    bad_key = judge(rcode=dns.rcode.NOTAUTH, tsig_error=dns.rcode.BADKEY)
    assert isinstance(bad_key, register.Rejected) and bad_key.tsig_error == "BADKEY"
    refused = judge(rcode=dns.rcode.REFUSED)
    assert isinstance(refused, register.Rejected) and refused.rcode == "REFUSED"
    assert isinstance(judge(rcode=dns.rcode.SERVFAIL), register.Transient)
    server_time = int(time.time()) - 400
    other = struct.pack("!HI", server_time >> 32, server_time & 0xFFFFFFFF)
    with caplog.at_level(logging.WARNING, "mesh.discovery.register"):
        bad_time = judge(
            rcode=dns.rcode.NOTAUTH, tsig_error=dns.rcode.BADTIME, other=other
        )
    assert isinstance(bad_time, register.Transient)
    assert (
        "+400 s off" in caplog.text
        or "+399 s off" in caplog.text
        or "+401 s off" in caplog.text
    )


def test_unsigned_success_is_not_believed() -> None:
    query = _sent(register.build_add(ZONE, KEY, RECORD, lease=30))
    response = dns.message.make_response(query)
    response.tsig = None
    response.keyring = None
    verdict = register.read_reply(query, response.to_wire())
    assert isinstance(verdict, register.Transient)


def test_renewal_delay_is_about_eighty_percent_with_jitter() -> None:
    rng = random.Random(9664)
    delays = [register.renewal_delay(30.0, rng) for _ in range(1000)]
    assert 0.70 * 30 <= min(delays) and max(delays) <= 0.85 * 30
    assert max(delays) - min(delays) > 3  # spread, not one instant


def test_clock_skew_gets_badtime_and_a_typed_error(
    responder: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Only this thread's clock jumps 400 s ahead; the responder runs in its own.
    main = threading.current_thread()
    real = time.time

    class Skewed:
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        @staticmethod
        def time() -> float:
            return real() + (400 if threading.current_thread() is main else 0)

    monkeypatch.setattr(dns.message, "time", Skewed())
    registrar = register.Registrar(
        [responder.address], responder.zone, responder.key, budget=1.0
    )
    with caplog.at_level(logging.WARNING, "mesh.discovery.register"):
        with pytest.raises(RegistrationError) as info:
            registrar.register("_svc._tcp", "host-a", 5000, ["127.0.0.2"])
    assert not isinstance(info.value, RegistrationRejected)
    assert "BADTIME" in str(info.value)
    assert "s off the server's" in caplog.text
