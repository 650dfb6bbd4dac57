"""Fixtures for Hit tests: servers on 127.0.0.1 port 0, a static resolver."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from mesh.examples.blobstore import BlobStore
from mesh.hit.server import HitServer


@dataclasses.dataclass(frozen=True)
class FakeTarget:
    """What the client needs from mesh.discovery.resolve.Target."""

    endpoint: str


class StaticResolver:
    """Answers every name with the same targets, in the order given."""

    def __init__(self, *endpoints: str) -> None:
        self.targets = [FakeTarget(e) for e in endpoints]
        self.asked = 0

    def resolve(self, name: str) -> list[FakeTarget]:
        self.asked += 1
        return list(self.targets)


class Recorder:
    """A handler that records where each of its methods ran."""

    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata
        self._log("open")

    def _log(self, what: str) -> None:
        with Recorder.lock:
            Recorder.events.append((what, threading.get_ident()))

    def thread(self) -> int:
        self._log("call")
        return threading.get_ident()

    def meta(self) -> str:
        import json

        return json.dumps(self.metadata)

    def echo(self, *frames: memoryview) -> tuple[memoryview, ...]:
        return frames

    def fail(self, text: memoryview) -> None:
        raise ValueError(str(text, "utf-8"))

    def sleep(self, seconds: memoryview) -> str:
        time.sleep(float(str(seconds, "utf-8")))
        return "slept"

    def big(self, size: memoryview) -> bytes:
        return bytes(int(str(size, "utf-8")))

    def many(self, count: memoryview) -> list[bytes]:
        return [b"x"] * int(str(count, "utf-8"))

    def close(self) -> None:
        self._log("close")


@pytest.fixture
def make_server() -> Iterator[Callable[..., HitServer]]:
    servers: list[HitServer] = []

    def make(
        factory: Callable[[dict[str, Any]], Any] = BlobStore, **kw: Any
    ) -> HitServer:
        server = HitServer(factory, **kw).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server: Callable[..., HitServer]) -> HitServer:
    return make_server(Recorder)


def endpoints(*servers: HitServer) -> Sequence[str]:
    return [s.endpoint for s in servers]


class SyncDriver:
    """Opens Hits with the blocking Client; the tests' common interface."""

    kind = "sync"

    def __init__(self, resolver: Any, **options: Any) -> None:
        from mesh.hit.client import Client

        self.client = Client("_test._tcp.mesh.internal.", resolver=resolver, **options)

    def open(self, metadata: dict[str, Any] | None = None) -> Any:
        return self.client.hit(metadata)

    def close(self) -> None:
        self.client.close()


class _ActorHit:
    """An AsyncHit driven from a test thread: one task owns it and runs each op."""

    def __init__(self, driver: AsyncDriver, metadata: dict[str, Any] | None) -> None:
        import asyncio
        import concurrent.futures

        self._driver = driver
        self._inbox: asyncio.Queue[Any] | None = None
        opened: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._task = asyncio.run_coroutine_threadsafe(
            self._actor(metadata, opened), driver.loop
        )
        self._hit = opened.result(timeout=60)
        self.endpoint = self._hit.endpoint
        self.hit_id = self._hit.hit_id

    async def _actor(self, metadata: dict[str, Any] | None, opened: Any) -> None:
        import asyncio

        self._inbox = asyncio.Queue()
        try:
            hit = await self._driver.client.open(metadata)
        except BaseException as exc:
            opened.set_exception(exc)
            return
        opened.set_result(hit)
        while True:
            op, args, kwargs, result = await self._inbox.get()
            if op is None:
                return
            try:
                value = getattr(hit, op)(*args, **kwargs)
                if hasattr(value, "__await__"):
                    value = await value
                result.set_result(value)
            except BaseException as exc:
                result.set_exception(exc)

    def _do(self, op: str | None, *args: Any, **kwargs: Any) -> Any:
        import concurrent.futures

        result: concurrent.futures.Future[Any] = concurrent.futures.Future()
        assert self._inbox is not None
        self._driver.loop.call_soon_threadsafe(
            self._inbox.put_nowait, (op, args, kwargs, result)
        )
        if op is None:
            return None
        return result.result(timeout=120)

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        return self._do("call", method, *args, timeout=timeout)

    def close(self) -> None:
        try:
            self._do("close")
        finally:
            self._do(None)
            self._task.result(timeout=30)

    @property
    def closed(self) -> bool:
        return bool(self._hit.closed)

    def __enter__(self) -> _ActorHit:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._do("abandon")
            self._do(None)


class AsyncDriver:
    """Opens Hits with the AsyncClient on a loop running in a helper thread."""

    kind = "async"

    def __init__(self, resolver: Any, **options: Any) -> None:
        import asyncio

        from mesh.hit.aio import AsyncClient

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.client = AsyncClient(
            "_test._tcp.mesh.internal.", resolver=resolver, **options
        )

    def open(self, metadata: dict[str, Any] | None = None) -> Any:
        return _ActorHit(self, metadata)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.client.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(params=["sync", "async"])
def make_driver(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    drivers: list[Any] = []
    cls = SyncDriver if request.param == "sync" else AsyncDriver

    def make(*endpoints: str, **options: Any) -> Any:
        driver = cls(StaticResolver(*endpoints), **options)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.close()
