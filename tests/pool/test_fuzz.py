"""Garbage at a live pool's masters (issue 6): they stay up and keep serving.

Two hosts (127.0.0.2-3) x two member processes find each other through a
directory of files. Hypothesis sends batches of random multipart messages
from raw DEALERs to both masters' member and peer endpoints: random frames,
the kinds the masters handle with malformed headers, unknown broadcast ids,
5000-frame messages, multi-megabyte frames, random identities. After each
batch a real broadcast must reach every member; at the end the masters are
the same processes and grew by less than 100 MB.

Forged heartbeats are accepted as they would be from any process (without
Curve nothing tells them apart), so a batch may seat a fake member or peer
until the liveness window drops it; the check allows for that long.
"""

from __future__ import annotations

import json
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from mesh.pool.tracker import Outcome

from .cluster import Cluster

pytestmark = pytest.mark.slow

HOSTS = ["127.0.0.2", "127.0.0.3"]
PER_HOST = 2
# The real hosts are in here on purpose: forging them is the worst case.
FAKE_HOSTS = [*HOSTS, "127.0.0.9", "::1", "localhost", "", "300.1.1.1"]
ENDPOINTS = [
    "tcp://127.0.0.9:5555",
    "tcp://127.0.0.3:1",
    "tcp://127.0.0.3:99999",
    "tcp://[::1]:5",
    "tcp://[::1:5",
    "ipc:///tmp/nowhere",
    "bogus",
]
KINDS = [
    b"HB", b"BCAST", b"EV", b"FWD", b"BYE", b"STATUS", b"REPLY", b"WORKING",
    b"FAILED", b"DONE", b"REQ", b"REFUSED", b"RESIGN", b"NOPE",
]  # fmt: skip
KEYS = ["host", "endpoint", "epoch", "bid", "timeout", "exclude", "id", "pid"]
# Seconds a check may take: a forged member or peer lasts one liveness window
# (1 s by default) and a retry needs a few broadcasts of 3 s at most.
CHECK_BUDGET = 15.0

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(FAKE_HOSTS + ENDPOINTS),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
headers = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8).map(json.dumps),
    json_values.map(json.dumps),
    st.integers(1, 50_000).map(lambda n: "[" * n + "]" * n),
).map(str.encode) | st.binary(max_size=64)
frames_of_kind = st.builds(
    lambda kind, header, rest: [kind, header, *rest],
    st.sampled_from(KINDS),
    headers,
    st.lists(st.binary(max_size=32) | st.text(max_size=24).map(str.encode), max_size=4),
)
many_frames = st.builds(
    lambda kind, n: [kind, *([b""] * n)],
    st.sampled_from(KINDS),
    st.sampled_from([100, 1000, 5000]),
)
huge_frame = st.builds(
    lambda kind, mb: [kind, b"{}", b"x" * (mb * 1024 * 1024)],
    st.sampled_from(KINDS),
    st.integers(1, 4),
)
random_frames = st.lists(st.binary(max_size=64), min_size=1, max_size=6)
# Text identities can name a member in a well-formed heartbeat.
identities = st.text(string.ascii_letters + string.digits, min_size=1, max_size=12)


@st.composite
def member_heartbeat(draw: st.DrawFn, identity: str) -> list[bytes]:
    header = {"id": identity, "host": draw(st.sampled_from(HOSTS)), "pid": 1}
    return [b"HB", json.dumps(header).encode()]


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[int, str, list[bytes]]]:
    """(master index, endpoint name, frames) per message, from a few identities."""
    ids = draw(st.lists(identities, min_size=1, max_size=3, unique=True))
    batch = []
    for _ in range(draw(st.integers(1, 40))):
        identity = draw(st.sampled_from(ids))
        frames = draw(
            st.one_of(
                frames_of_kind,
                frames_of_kind,
                random_frames,
                many_frames,
                member_heartbeat(identity),
            )
        )
        batch.append((draw(st.integers(0, 1)), identity, frames))
    if draw(st.integers(0, 3)) == 0:
        batch.append((draw(st.integers(0, 1)), ids[0], draw(huge_frame)))
    return [(m, which, frames) for m, which, frames in _spread(draw, batch)]


def _spread(
    draw: st.DrawFn, batch: list[tuple[int, str, list[bytes]]]
) -> Iterator[tuple[int, str, list[bytes]]]:
    # Each message goes to the member or the peer endpoint, its identity kept.
    for master, identity, frames in batch:
        endpoint = draw(st.sampled_from(["endpoint", "peer_endpoint"]))
        yield master, f"{endpoint}/{identity}", frames


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, HOSTS, per_host=PER_HOST, issuer_host=HOSTS[1])
    try:
        c.start()
        c.converge()
        yield c
    finally:
        c.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_masters_survive_random_messages(cluster: Cluster) -> None:
    records = [cluster.master_record(host) for host in HOSTS]
    assert all(records)
    masters = [
        (int(r["pid"]), str(r["endpoint"]), str(r["peer_endpoint"]))
        for r in records
        if r
    ]
    rss_before = {pid: rss_kib(pid) for pid, _, _ in masters}
    context: zmq.Context[Any] = zmq.Context()
    counts = {"messages": 0, "broadcasts": 0}

    def all_reply() -> None:
        deadline = time.monotonic() + CHECK_BUDGET
        while True:
            result = cluster.broadcast(b"check", timeout=3.0)
            counts["broadcasts"] += 1
            if (
                result.complete
                and result.counts[Outcome.REPLIED] == PER_HOST * len(HOSTS)
                and not result.unreachable_hosts
            ):
                return
            assert time.monotonic() < deadline, f"pool broken: {result}"
            time.sleep(0.1)

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(batches())
    def send_batch(batch: list[tuple[int, str, list[bytes]]]) -> None:
        note(f"batch of {len(batch)}: {[f[:2] for _, _, f in batch]!r:.2000}")
        sockets: dict[tuple[int, str], zmq.Socket[bytes]] = {}
        try:
            for master, target, frames in batch:
                sock = sockets.get((master, target))
                if sock is None:
                    which, identity = target.split("/", 1)
                    sock = context.socket(zmq.DEALER)
                    sock.setsockopt(zmq.IDENTITY, identity.encode())
                    sock.setsockopt(zmq.SNDTIMEO, 5000)
                    sock.connect(masters[master][1 if which == "endpoint" else 2])
                    sockets[(master, target)] = sock
                sock.send_multipart(frames)
                counts["messages"] += 1
        finally:
            for sock in sockets.values():
                # Long enough for the last messages to leave.
                sock.close(linger=2000)
        for pid, _, _ in masters:
            assert Path(f"/proc/{pid}").exists(), f"master {pid} died"
        all_reply()

    try:
        send_batch()
    finally:
        context.destroy(linger=0)
    for host, (pid, _, _) in zip(HOSTS, masters, strict=True):
        record = cluster.master_record(host)
        assert record is not None and record["pid"] == pid, f"{host} changed master"
        grown = rss_kib(pid) - rss_before[pid]
        assert grown < 100 * 1024, f"master {pid} grew {grown} KiB"
    print(
        f"pool fuzz: {counts['messages']} messages to {2 * len(masters)} sockets, "
        f"{counts['broadcasts']} broadcasts checked"
    )
