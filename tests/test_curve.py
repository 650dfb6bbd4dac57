"""CurveZMQ on Hit and pool sockets: keys, allow-lists, refusals, revocation."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from mesh.config import Settings
from mesh.curve import Curve, new_keypair, warn_if_exposed
from mesh.errors import ConfigError, MasterUnavailable, NoTargetAvailable
from mesh.examples.blobstore import BlobStore
from mesh.hit.client import Client
from mesh.hit.server import HitServer
from mesh.pool.member import PoolMember, demo_handler
from mesh.pool.tracker import Outcome


@dataclasses.dataclass(frozen=True)
class Target:
    endpoint: str


@dataclasses.dataclass
class OneTarget:
    endpoint: str

    def resolve(self, name: str) -> list[Target]:
        return [Target(self.endpoint)]


@dataclasses.dataclass
class Keys:
    dir: Path
    allow: Path

    def settings(self, name: str, **extra: object) -> Settings:
        return Settings(
            curve_secret_key=self.dir / f"{name}.key_secret",
            curve_allow_dir=self.allow,
            curve_server_key=self.dir / "server.key",
            **extra,  # type: ignore[arg-type]
        )

    def curve(self, name: str) -> Curve:
        curve = Curve.from_settings(self.settings(name))
        assert curve is not None
        return curve


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    keys = Keys(tmp_path / "keys", tmp_path / "allow")
    for name in ("server", "client", "stranger"):
        new_keypair(keys.dir, name)
    keys.allow.mkdir()
    for name in ("server", "client"):
        shutil.copy(keys.dir / f"{name}.key", keys.allow)
    return keys


def test_mesh_keys_new_writes_a_private_pair(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "mesh", "keys", "new", "web-1"]
    args = ["--dir", str(tmp_path / "k"), "--allow-dir", str(tmp_path / "allow")]
    out = subprocess.run(run + args, capture_output=True, text=True, check=True)
    secret = tmp_path / "k" / "web-1.key_secret"
    assert os.stat(secret).st_mode & 0o777 == 0o600
    public, secret_key = zmq.auth.load_certificate(secret)
    assert secret_key is not None
    assert zmq.auth.load_certificate(tmp_path / "allow" / "web-1.key")[0] == public
    assert secret_key.decode() not in out.stdout + out.stderr
    again = subprocess.run(run + args, capture_output=True, text=True)
    assert again.returncode == 1
    assert "exists" in again.stderr


def test_secret_key_readable_by_others_is_refused(keys: Keys) -> None:
    secret = keys.dir / "client.key_secret"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        keys.curve("client")
    _, secret_key = zmq.auth.load_certificate(secret)
    assert secret_key is not None
    assert secret_key.decode() not in str(info.value)
    assert secret_key.decode() not in repr(Curve.from_settings)


def test_curve_settings_without_our_key_are_an_error(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="curve_secret_key"):
        Curve.from_settings(Settings(curve_allow_dir=keys.allow))


def test_repr_hides_the_secret(keys: Keys) -> None:
    curve = keys.curve("client")
    assert curve.secret.decode() not in repr(curve)
    assert curve.public.decode() in repr(curve)


def _client(server: HitServer, curve: Curve | None) -> Client:
    return Client(
        "_blob._tcp.mesh.internal.",
        resolver=OneTarget(server.endpoint),
        open_timeout=0.5,
        open_attempts=1,
        curve=curve,
    )


def test_allowed_client_opens_hits_others_are_refused(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mesh.curve")
    with HitServer(BlobStore, curve=keys.curve("server")) as server:
        with _client(server, keys.curve("client")) as client, client.hit() as hit:
            digest = hit.call("put", "a", b"over curve").text()
            assert hit.call("sha256", "a").text() == digest

        # A key the server does not know, and no Curve at all: both refused.
        for curve in (keys.curve("stranger"), None):
            with _client(server, curve) as client:
                with pytest.raises(NoTargetAvailable) as info:
                    client.hit()
            hint = "allow-list" if curve is not None else "requires Curve"
            assert hint in str(info.value)
        stranger = keys.curve("stranger").public.decode()
        refusals = [r for r in caplog.records if stranger in r.getMessage()]
        assert refusals and all(r.levelno == logging.DEBUG for r in refusals)

        # The refusals cost the allowed client nothing.
        with _client(server, keys.curve("client")) as client, client.hit() as hit:
            assert hit.call("count").text() == "0"


def test_revoked_key_is_refused_without_restart(keys: Keys) -> None:
    with HitServer(BlobStore, curve=keys.curve("server")) as server:
        with _client(server, keys.curve("client")) as client:
            with client.hit() as hit:
                hit.call("count")
            (keys.allow / "client.key").unlink()
            with pytest.raises(NoTargetAvailable):
                client.hit()
            shutil.copy(keys.dir / "client.key", keys.allow)
            with client.hit() as hit:
                hit.call("count")


def test_server_curve_needs_an_allow_list(keys: Keys) -> None:
    settings = dataclasses.replace(keys.settings("server"), curve_allow_dir=None)
    curve = Curve.from_settings(settings)
    with pytest.raises(ConfigError, match="allow-list"):
        HitServer(BlobStore, curve=curve)


def test_public_bind_without_curve_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mesh.curve"):
        warn_if_exposed("127.0.0.1", None, "Hit server")
        warn_if_exposed("::1", None, "Hit server")
        assert not caplog.records
        with HitServer(BlobStore, bind="0.0.0.0"):
            pass
    assert any("without Curve" in r.getMessage() for r in caplog.records)


def test_pool_over_curve_refuses_a_stranger(keys: Keys, tmp_path: Path) -> None:
    members: list[PoolMember] = []

    def member(name: str) -> PoolMember:
        settings = keys.settings(
            name, runtime_dir=tmp_path / "run", heartbeat_interval=0.1
        )
        m = PoolMember("p", settings, demo_handler("127.0.0.1"), directory=None)
        m.start()
        members.append(m)
        return m

    try:
        first, second = member("server"), member("server")
        assert first.wait_for_master(5.0) and second.wait_for_master(5.0)
        # A stranger cannot win the election while the master is alive, and
        # cannot reach the master with its key: it never joins.
        stranger = PoolMember(
            "p",
            keys.settings("stranger", runtime_dir=tmp_path / "run"),
            demo_handler("127.0.0.1"),
            directory=None,
            eligible=False,
        )
        stranger.start()
        members.append(stranger)
        assert not stranger.wait_for_master(1.0)
        with pytest.raises(MasterUnavailable):
            stranger.broadcast(b"x", timeout=1.0)
        result = second.broadcast(b"hi", timeout=5.0)
        assert result.complete
        assert result.counts[Outcome.REPLIED] == 2
        assert {r.id for r in result.replies} == {first.info.id, second.info.id}
    finally:
        for m in members:
            m.close()


def test_member_that_may_become_master_needs_the_servers_pair(
    keys: Keys, tmp_path: Path
) -> None:
    settings = keys.settings("client", runtime_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="servers' keypair"):
        PoolMember("p", settings, demo_handler("127.0.0.1"), directory=None)
    # Kept out of the election, a client pair may join.
    PoolMember(
        "p", settings, demo_handler("127.0.0.1"), directory=None, eligible=False
    ).close()


def test_a_broken_allow_list_file_is_skipped_not_fatal(keys: Keys) -> None:
    with HitServer(BlobStore, curve=keys.curve("server")) as server:
        (keys.allow / "half.key").write_text("")
        (keys.allow / "junk.key").write_bytes(b"\x00\xff not a certificate")
        with _client(server, keys.curve("client")) as client, client.hit() as hit:
            hit.call("count")
    # The server stopped (ZAP thread included) without hanging.
    assert server.wait(5.0)


def test_a_key_overwritten_in_place_is_revoked(keys: Keys) -> None:
    with HitServer(BlobStore, curve=keys.curve("server")) as server:
        with _client(server, keys.curve("client")) as client:
            with client.hit() as hit:
                hit.call("count")
            # Same file name, other key: the directory's mtime need not change.
            (keys.allow / "client.key").write_bytes(
                (keys.dir / "stranger.key").read_bytes()
            )
            with pytest.raises(NoTargetAvailable):
                client.hit()
        with _client(server, keys.curve("stranger")) as client, client.hit() as hit:
            hit.call("count")


@pytest.mark.slow
def test_a_refused_member_says_so_and_never_votes_the_master_out(
    keys: Keys, tmp_path: Path
) -> None:
    import time

    run = tmp_path / "run"
    env = dict(
        os.environ,
        MESH_CURVE_SECRET_KEY=str(keys.dir / "server.key_secret"),
        MESH_CURVE_ALLOW_DIR=str(keys.allow),
        MESH_HEARTBEAT_INTERVAL="0.1",
    )
    argv = [sys.executable, "-m", "mesh.pool.member", "--pool", "p"]
    argv += ["--host", "127.0.0.9", "--runtime-dir", str(run)]
    argv += ["--directory-dir", str(tmp_path / "directory")]
    master = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    stranger = None
    try:
        record = run / "p.master"
        deadline = time.monotonic() + 20
        while not record.exists():
            assert time.monotonic() < deadline, "no master"
            time.sleep(0.1)
        # The stranger is the whole electorate: had it voted, it would kill.
        stranger = PoolMember(
            "p",
            keys.settings("stranger", runtime_dir=run, heartbeat_interval=0.1),
            demo_handler("127.0.0.9"),
            "127.0.0.9",
            directory=None,
            eligible=False,
        )
        stranger.start()
        time.sleep(2.0)  # five liveness windows
        assert master.poll() is None, "the refused member killed the master"
        assert not list((run / "p.votes").iterdir())
        with pytest.raises(MasterUnavailable, match="refused this member's Curve key"):
            stranger.broadcast(b"x", timeout=1.0)
        # Allowed later, it joins without a restart.
        shutil.copy(keys.dir / "stranger.key", keys.allow)
        assert stranger.wait_for_master(10.0)
        assert stranger.broadcast(b"hi", timeout=5.0).counts[Outcome.REPLIED] == 2
    finally:
        if stranger is not None:
            stranger.close()
        master.kill()
        master.wait(10)


def test_no_connection_names_the_likely_curve_cause(keys: Keys) -> None:
    from mesh.hit.client import no_connection

    assert "requires Curve" in no_connection(2.0, None)
    assert "allow-list" in no_connection(2.0, keys.curve("client"))
    own = Curve.from_settings(Settings(curve_secret_key=keys.dir / "client.key_secret"))
    assert "MESH_CURVE_SERVER_KEY is not set" in no_connection(2.0, own)
    # Given explicitly, even when it is our own key (mesh up), it is set.
    server = keys.curve("server")
    assert server.public == server.server_public
    assert "MESH_CURVE_SERVER_KEY is not set" not in no_connection(2.0, server)
