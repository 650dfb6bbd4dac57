"""Hit overhead against raw pyzmq REQ/REP, measured in the same run.

Prints, for each measurement, srvmesh's figure, raw pyzmq's, and the ratio:
a call in an open Hit vs a raw round trip; opening a Hit (static resolver,
connect, OPEN, first call, CLOSE) vs a new REQ socket's connect and first
round trip; and 64 MiB echo throughput vs raw REQ/REP with ``copy=False``.
Everything runs on 127.0.0.1, servers on threads of this process.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.examples.blobstore import BlobStore  # noqa: E402
from mesh.hit.client import Client  # noqa: E402
from mesh.hit.server import HitServer  # noqa: E402

SMALL = b"x" * 64
BIG = bytes(64 * 1024 * 1024)


@dataclasses.dataclass(frozen=True)
class Target:
    endpoint: str


class Static:
    def __init__(self, endpoint: str) -> None:
        self.targets = [Target(endpoint)]

    def resolve(self, name: str) -> list[Target]:
        return self.targets


def raw_echo_server(ctx: zmq.Context[zmq.Socket[bytes]], stop: threading.Event) -> str:
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    port = rep.bind_to_random_port("tcp://127.0.0.1")

    def run() -> None:
        while not stop.is_set():
            if rep.poll(100):
                rep.send_multipart(rep.recv_multipart(copy=False), copy=False)
        rep.close()

    threading.Thread(target=run, daemon=True).start()
    return f"tcp://127.0.0.1:{port}"


def timed(n: int, fn: Callable[[], object]) -> float:
    """Median seconds per call over n calls, after a short warm-up."""
    for _ in range(min(20, n)):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stop = threading.Event()
    raw_endpoint = raw_echo_server(ctx, stop)
    server = HitServer(BlobStore, max_hits=1024).start()
    client = Client("_bench._tcp.mesh.internal.", resolver=Static(server.endpoint))

    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(raw_endpoint)

    def raw_call() -> None:
        req.send(SMALL)
        req.recv()

    def raw_setup() -> None:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(raw_endpoint)
        sock.send(SMALL)
        sock.recv()
        sock.close()

    def raw_big() -> None:
        req.send(BIG, copy=False)
        req.recv(copy=False)

    rows = []
    with client.hit() as hit:
        rows.append(
            (
                "call in an open Hit",
                timed(3000, lambda: hit.call("echo", SMALL)),
                timed(3000, raw_call),
                "us",
            )
        )

        def hit_big() -> None:
            hit.call("echo", BIG)

        big_hit = timed(15, hit_big)
        big_raw = timed(15, raw_big)

    def hit_open() -> None:
        with client.hit() as h:
            h.call("echo", SMALL)

    rows.append(
        ("open + first call", timed(500, hit_open), timed(500, raw_setup), "us")
    )

    print(f"{'measurement':<26}{'srvmesh':>12}{'raw pyzmq':>12}{'ratio':>8}")
    for name, ours, raw, _unit in rows:
        print(f"{name:<26}{ours * 1e6:>10.0f}us{raw * 1e6:>10.0f}us{ours / raw:>8.2f}")
    mib = len(BIG) / 2**20
    # Throughput counts both directions of the echo.
    ours_tp, raw_tp = 2 * mib / big_hit, 2 * mib / big_raw
    print(
        f"{'64 MiB echo throughput':<26}{ours_tp:>8.0f}MiB/s{raw_tp:>6.0f}MiB/s"
        f"{ours_tp / raw_tp:>8.2f}"
    )

    req.close()
    stop.set()
    server.close()
    client.close()
    time.sleep(0.2)
    ctx.term()


if __name__ == "__main__":
    main()
