"""``mesh serve`` as a real process: SIGKILL mid-Hit, SIGTERM drain, SIGINT twice, fork."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mesh.errors import HitLost, NoTargetAvailable
from mesh.hit.client import Client

from .conftest import StaticResolver

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(self, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mesh",
                "serve",
                "tests.hit.slow_handler:Sleeper",
                "--service",
                "test",
                "--no-register",
                *extra,
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert " on tcp://" in line, line
        self.endpoint = line.rsplit(" on ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def spawn() -> Iterator[Callable[..., ServerProcess]]:
    procs: list[ServerProcess] = []

    def make(*extra: str) -> ServerProcess:
        p = ServerProcess(*extra)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


def client(*endpoints: str, **options: float) -> Client:
    return Client(
        "_test._tcp.mesh.internal.", resolver=StaticResolver(*endpoints), **options
    )


def test_sigkill_mid_hit_gives_hit_lost_in_time_and_the_next_hit_goes_elsewhere(
    spawn: Callable[..., ServerProcess],
) -> None:
    doomed, alive = spawn(), spawn()
    with client(
        doomed.endpoint, alive.endpoint, ping_interval=0.2, liveness_timeout=1.5
    ) as c:
        hit = c.hit()
        assert hit.endpoint == doomed.endpoint
        hit.call("put", "a", b"data")
        killer_at = time.monotonic() + 0.5

        def kill_soon() -> None:
            time.sleep(max(0.0, killer_at - time.monotonic()))
            doomed.proc.send_signal(signal.SIGKILL)

        import threading

        threading.Thread(target=kill_soon).start()
        with pytest.raises(HitLost):
            hit.call("sleep", "30")
        # Liveness 1.5 s after the kill, with generous slack for a loaded box.
        assert time.monotonic() - killer_at < 1.5 + 3.0
        with c.hit() as again:
            assert again.endpoint == alive.endpoint
            assert again.call("count").text() == "0"


def test_sigterm_drains_busy_to_new_opens_and_waits_for_open_hits(
    spawn: Callable[..., ServerProcess],
) -> None:
    server = spawn("--drain-timeout", "20")
    with client(server.endpoint, open_attempts=1) as c:
        hit = c.hit()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(NoTargetAvailable, match="draining"):
            c.hit()
        assert hit.call("put", "b", b"xyz").text()
        assert server.proc.poll() is None
        hit.close()
        assert server.proc.wait(10) == 0


def test_sigint_twice_exits_at_once_with_hits_open(
    spawn: Callable[..., ServerProcess],
) -> None:
    server = spawn("--drain-timeout", "60")
    with client(server.endpoint) as c:
        hit = c.hit()
        hit.call("count")
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(10) == 0
        hit._abandon()


def _child_opens_hits(
    endpoint: str, shared: Client, queue: multiprocessing.Queue[str]
) -> None:
    try:
        with shared.hit() as hit:
            queue.put(hit.call("count").text())
    except BaseException as exc:
        queue.put(repr(exc))


def test_forked_children_get_their_own_context(
    spawn: Callable[..., ServerProcess],
) -> None:
    server = spawn()
    fork = multiprocessing.get_context("fork")
    with client(server.endpoint) as c:
        with c.hit() as hit:
            hit.call("count")
        for _ in range(3):
            queue: multiprocessing.Queue[str] = fork.Queue()
            child = fork.Process(
                target=_child_opens_hits, args=(server.endpoint, c, queue)
            )
            child.start()
            assert queue.get(timeout=30) == "0"
            child.join(30)
            assert child.exitcode == 0
        with c.hit() as hit:
            assert hit.call("count").text() == "0"


def test_async_sigkill_mid_hit_gives_hit_lost_and_the_next_hit_goes_elsewhere(
    spawn: Callable[..., ServerProcess],
) -> None:
    import asyncio
    import threading

    from mesh.hit.aio import AsyncClient

    doomed, alive = spawn(), spawn()
    killed: list[float] = []

    def kill_soon() -> None:
        time.sleep(0.5)
        killed.append(time.monotonic())
        doomed.proc.send_signal(signal.SIGKILL)

    async def main() -> None:
        async with AsyncClient(
            "_test._tcp.mesh.internal.",
            resolver=StaticResolver(doomed.endpoint, alive.endpoint),
            ping_interval=0.2,
            liveness_timeout=1.5,
        ) as c:
            hit = await c.open()
            assert hit.endpoint == doomed.endpoint
            await hit.call("put", "a", b"data")
            threading.Thread(target=kill_soon).start()
            with pytest.raises(HitLost):
                await hit.call("sleep", "30")
            # Liveness 1.5 s after the kill, with generous slack for a loaded box.
            assert time.monotonic() - killed[0] < 1.5 + 3.0
            async with c.hit() as again:
                assert again.endpoint == alive.endpoint
                assert (await again.call("count")).text() == "0"

    asyncio.run(main())
