"""Random multipart messages against a real ``mesh serve`` process's front socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.hit import protocol
from mesh.hit.client import Client
from mesh.hit.protocol import Kind

from .conftest import StaticResolver

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAX_FRAMES = 64
MAX_SIZE = 1024 * 1024

headers = st.builds(
    protocol.encode_header,
    st.sampled_from(list(Kind)),
    st.one_of(st.just(0), st.integers(0, 2**64 - 1)),
    st.integers(0, 2**64 - 1),
)
garbage = st.binary(max_size=40)
payloads = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"{}", b"[" * 50_000, b'{"a": 1}', b"\xff\xfe", b"echo"]),
    st.sampled_from([json.dumps({"max_message_size": -1, "max_frames": 0}).encode()]),
    st.integers(1, 3 * MAX_SIZE).map(bytes),  # some past MAXMSGSIZE
)
# OPENs get their own share: their metadata is the one frame the server parses.
opens = st.builds(
    lambda request_id, frames: (
        [protocol.encode_header(Kind.OPEN, 0, request_id)] + frames
    ),
    st.integers(0, 2**64 - 1),
    st.lists(payloads, min_size=1, max_size=2),
)
messages = st.one_of(
    opens,
    st.lists(garbage, max_size=6),
    st.tuples(headers, st.lists(payloads, max_size=4)).map(lambda t: [t[0], *t[1]]),
    # Huge frame counts, with and without a readable header.
    st.tuples(st.one_of(headers, garbage), st.integers(MAX_FRAMES, 200_000)).map(
        lambda t: [t[0]] + [b""] * t[1]
    ),
)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_random_messages_neither_crash_nor_bloat_the_server() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh",
            "serve",
            "tests.hit.slow_handler:Sleeper",
            "--service",
            "fuzz",
            "--no-register",
            "--max-frames",
            str(MAX_FRAMES),
            "--max-message-size",
            str(MAX_SIZE),
            "--idle-timeout",
            "2",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    ctx = zmq.Context()
    client = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert " on tcp://" in line, line
        endpoint = line.rsplit(" on ", 1)[1].strip()
        client = Client(
            "_fuzz._tcp.z.", resolver=StaticResolver(endpoint), call_timeout=10
        )

        def real_hit_works() -> None:
            with client.hit() as hit:
                assert hit.call("put", "k", b"v").text()
                assert hit.call("count").text() == "1"

        real_hit_works()
        baseline = rss_kib(proc.pid)
        tried = 0

        @settings(
            max_examples=100,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(messages, min_size=1, max_size=8))
        def batch(batch: list[list[bytes]]) -> None:
            nonlocal tried
            socks = [ctx.socket(zmq.DEALER) for _ in range(2)]
            try:
                for sock in socks:
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.SNDTIMEO, 2000)
                    sock.connect(endpoint)
                for i, frames in enumerate(batch):
                    if frames:
                        socks[i % 2].send_multipart(frames)
                    tried += 1
                for sock in socks:
                    while sock.poll(20):
                        sock.recv_multipart()
            finally:
                for sock in socks:
                    sock.close()
            assert proc.poll() is None, "the server died"
            real_hit_works()

        batch()
        print(f"hit fuzz: {tried} messages")
        assert proc.poll() is None
        grown = rss_kib(proc.pid) - baseline
        assert grown < 100 * 1024, f"RSS grew by {grown} KiB"
    finally:
        if client is not None:
            client.close()
        ctx.term()
        proc.kill()
        proc.wait(10)
