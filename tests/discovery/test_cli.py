"""``mesh register``, ``mesh unregister`` and ``mesh ls`` against the responder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from mesh.cli import main
from mesh.discovery.resolve import Resolver
from mesh.errors import ServiceNotFound

SVC = "_orders._tcp.mesh.internal."


def _flags(responder: Any) -> list[str]:
    return [
        "--nameservers",
        responder.address,
        "--key-file",
        str(responder.key_file),
        "--zone",
        responder.zone,
    ]


def test_register_ls_unregister(
    responder: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = _flags(responder)
    assert (
        main(
            [
                "register",
                "orders",
                "7000",
                "--target",
                "web-1",
                "--address",
                "127.0.0.7,::1",
                "--weight",
                "5",
                *flags,
            ]
        )
        == 0
    )
    targets = Resolver([responder.address]).resolve(SVC)
    assert {t.endpoint for t in targets} == {"tcp://127.0.0.7:7000", "tcp://[::1]:7000"}
    capsys.readouterr()
    assert main(["ls", *flags, "--state-dir", str(responder.state_dir)]) == 0
    listing = capsys.readouterr().out
    assert "LEASE" in listing.splitlines()[0]
    line = next(x for x in listing.splitlines() if x.startswith(SVC))
    assert "web-1.mesh.internal." in line and "7000" in line and " 5 " in line
    assert "127.0.0.7" in line and "::1" in line
    # The remaining lease, read from the responder's journal: at most 30 s.
    lease = re.search(r" (\d+)s ", line)
    assert lease is not None and 0 < int(lease.group(1)) <= 30
    assert main(["unregister", "orders", "7000", "--target", "web-1", *flags]) == 0
    assert "deleted 1 SRV" in capsys.readouterr().out
    with pytest.raises(ServiceNotFound):
        Resolver([responder.address]).resolve(SVC)


@pytest.mark.slow
def test_register_keep_deletes_on_sigterm(responder: Any) -> None:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh",
            "register",
            "orders",
            "7000",
            "--target",
            "web-1",
            "--address",
            "127.0.0.7",
            "--keep",
            *_flags(responder),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                Resolver([responder.address]).resolve(SVC)
                break
            except ServiceNotFound:
                time.sleep(0.2)
        else:
            pytest.fail("mesh register --keep never registered")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "deleted" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(ServiceNotFound):
        Resolver([responder.address]).resolve(SVC)
