"""Fixtures shared by every part's tests."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        if "bind" in item.keywords and shutil.which("named") is None:
            item.add_marker(pytest.mark.skip(reason="BIND named is not installed"))
        if "netns" in item.keywords and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="network namespaces need root"))


# ---- the bundled DNS responder (mesh/responder) ----------------------------


@pytest.fixture
def responder(tmp_path):  # type: ignore[no-untyped-def]
    """A responder on 127.0.0.1:<free port> with a fresh key; see
    mesh.responder.testing.RunningResponder for its attributes (.address,
    .key_file, .key, .keyring, .zone, .state_dir, .responder)."""
    from mesh.responder.testing import start_responder

    running = start_responder(tmp_path)
    try:
        yield running
    finally:
        running.responder.stop()


@pytest.fixture
def dns_process(tmp_path):  # type: ignore[no-untyped-def]
    """A factory for ``mesh dns`` subprocesses sharing tmp_path's key/journal."""
    from mesh.responder.testing import DnsProcess

    started: list[DnsProcess] = []

    def start(
        port: int = 0, *extra: str, env: dict[str, str] | None = None
    ) -> DnsProcess:
        proc = DnsProcess(tmp_path, port, *extra, env=env).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
