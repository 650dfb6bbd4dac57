"""Resolver lookup time against dnspython's own cached lookup, on loopback.

Starts a bundled responder, registers a service with three targets, then
times, per lookup:

- dnspython bare cache hit: ``dns.resolver.Resolver`` with a ``Cache``
  (the baseline; no ordering, no targets built);
- srvmesh cached: ``Resolver.resolve`` served from its cache, including the
  RFC 2782 ordering and the list of targets;
- srvmesh uncached: a full resolution over UDP each time.

Goal (issue 2): cached resolve plus ordering at most 2x the baseline.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dns.resolver

from mesh.discovery.register import Registrar
from mesh.discovery.resolve import Resolver
from mesh.responder.testing import start_responder

SVC = "_bench._tcp.mesh.internal."


def per_call(fn: Callable[[], object], seconds: float = 1.0) -> float:
    """Best-of-three mean seconds per call, each run about ``seconds`` long."""
    fn()
    best = float("inf")
    for _ in range(3):
        count = 0
        start = time.perf_counter()
        while True:
            for _ in range(100):
                fn()
            count += 100
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / 3:
                break
        best = min(best, elapsed / count)
    return best


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        running = start_responder(Path(tmp))
        try:
            registrar = Registrar(
                [running.address], running.zone, running.key, lease=300
            )
            registrations = [
                registrar.register(
                    SVC,
                    f"host-{i}",
                    5000 + i,
                    [f"127.0.0.{i + 2}"],
                    weight=i + 1,
                    ttl=300,
                )
                for i in range(3)
            ]
            baseline = dns.resolver.Resolver(configure=False)
            baseline.nameservers = [running.host]
            baseline.port = running.port
            baseline.cache = dns.resolver.Cache()
            ours = Resolver([running.address])
            uncached = Resolver([running.address])

            def fresh() -> object:
                uncached.forget(SVC)
                return uncached.resolve(SVC)

            t_base = per_call(lambda: baseline.resolve(SVC, "SRV"))
            t_cached = per_call(lambda: ours.resolve(SVC))
            t_uncached = per_call(fresh, seconds=2.0)
            for registration in registrations:
                registration.close()
        finally:
            running.responder.stop()
    print(f"dnspython cached SRV lookup   {t_base * 1e6:8.1f} us  (baseline)")
    print(
        f"srvmesh cached resolve+order  {t_cached * 1e6:8.1f} us  "
        f"ratio {t_cached / t_base:5.2f}x  (goal <= 2.00x)"
    )
    print(
        f"srvmesh uncached resolve      {t_uncached * 1e6:8.1f} us  "
        f"ratio {t_uncached / t_base:5.2f}x"
    )
    return 0 if t_cached <= 2 * t_base else 1


if __name__ == "__main__":
    sys.exit(main())
