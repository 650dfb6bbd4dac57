"""deploy/systemd: the server unit's command line, run as systemd would run it.

The unit and its environment files are read and expanded with systemd's
rules (``${X}`` is one word, ``$X`` splits into words, empty gives none).
Only the addresses are moved to loopback and the keys to temporary ones:
the command, its flags and its clean stop are the unit's own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.curve import ensure_mesh_keys
from mesh.discovery.resolve import Resolver
from mesh.errors import DiscoveryError

pytestmark = pytest.mark.slow

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def exec_start(unit: Path, env: dict[str, str]) -> list[str]:
    text = unit.read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    argv: list[str] = []
    for word in line.removeprefix("ExecStart=").split():
        braced = re.fullmatch(r"\$\{(\w+)\}", word)
        bare = re.fullmatch(r"\$(\w+)", word)
        if braced:
            argv.append(env.get(braced[1], ""))
        elif bare:
            argv.extend(env.get(bare[1], "").split())
        else:
            argv.append(word)
    return argv


def srv_ports(address: str, name: str) -> set[int]:
    try:
        return {t.port for t in Resolver([address], timeout=1.0).resolve(name)}
    except DiscoveryError:
        return set()


@pytest.mark.parametrize("pool_args", ["--pool blobstore", ""])
def test_serve_unit_registers_serves_and_stops_clean(
    responder, tmp_path: Path, pool_args: str
) -> None:  # type: ignore[no-untyped-def]
    env = read_env(SYSTEMD / "mesh.env") | read_env(SYSTEMD / "blobstore-1.env")
    assert env["POOL_ARGS"] == "--pool blobstore"
    keys = ensure_mesh_keys(tmp_path / "curve")
    env |= {
        "BIND": "127.0.0.2",
        "ADVERTISE": "127.0.0.2",
        "POOL_ARGS": pool_args,
        "MESH_NAMESERVERS": responder.address,
        "MESH_KEY_FILE": str(responder.key_file),
        "MESH_RUNTIME_DIR": str(tmp_path / "run"),
        **keys.env(),
    }
    argv = exec_start(SYSTEMD / "srvmesh-serve@.service", env)
    assert argv[:2] == ["/opt/srvmesh/.venv/bin/mesh", "serve"]
    assert ("--pool" in argv) == bool(pool_args)
    assert "" not in argv
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    child_env |= {k: v for k, v in env.items() if k.startswith("MESH_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", *argv[1:]],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env,
    )
    name = f"_blobstore._tcp.{env['MESH_ZONE']}"
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line.rsplit(":", 1)[1])
        deadline = time.monotonic() + 30
        while port not in srv_ports(responder.address, name):
            assert time.monotonic() < deadline, "never registered"
            time.sleep(0.2)
        # systemd's stop is SIGTERM, then SIGKILL after TimeoutStopSec.
        unit = (SYSTEMD / "srvmesh-serve@.service").read_text()
        stop_timeout = int(re.search(r"TimeoutStopSec=(\d+)", unit)[1])  # type: ignore[index]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(stop_timeout) == 0
        assert port not in srv_ports(responder.address, name)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
