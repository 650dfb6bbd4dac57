"""Weights spread Hits across servers in proportion (RFC 2782 order from dnspython)."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable

import dns.rdataset
import pytest

from mesh.hit.client import Client
from mesh.hit.server import HitServer

from .conftest import Recorder


@dataclasses.dataclass(frozen=True)
class Target:
    endpoint: str


class WeightedResolver:
    """SRV records for the servers, ordered by dnspython's processing_order()."""

    def __init__(self, weighted: list[tuple[HitServer, int]]) -> None:
        text = [
            f"0 {w} {s.port} s{i}.mesh.internal." for i, (s, w) in enumerate(weighted)
        ]
        self.rdataset = dns.rdataset.from_text("IN", "SRV", 5, *text)
        self.by_port = {s.port: s.endpoint for s, _ in weighted}

    def resolve(self, name: str) -> list[Target]:
        return [Target(self.by_port[r.port]) for r in self.rdataset.processing_order()]


@pytest.mark.slow
def test_weights_spread_hits_in_proportion(
    make_server: Callable[..., HitServer],
) -> None:
    light, heavy = make_server(Recorder), make_server(Recorder)
    random.seed(2782)  # processing_order() draws from the global generator
    resolver = WeightedResolver([(light, 1), (heavy, 3)])
    counts: Counter[str] = Counter()
    with Client("_test._tcp.mesh.internal.", resolver=resolver) as client:
        for _ in range(400):
            with client.hit() as hit:
                counts[hit.endpoint] += 1
    share = counts[heavy.endpoint] / 400
    # Expected 0.75; 400 draws give a standard deviation of about 0.022.
    assert 0.65 < share < 0.85, counts
