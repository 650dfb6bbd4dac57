from pathlib import Path
from typing import Any

import pytest

from mesh.config import Settings
from mesh.deploy import load_manifest, plan
from mesh.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = (ROOT / "deploy" / "local.toml").read_text()


def test_local_manifest_reads() -> None:
    m = load_manifest(ROOT / "deploy" / "local.toml")
    assert m.zone == "mesh.internal."
    assert [h.address for h in m.hosts] == ["127.0.0.2", "127.0.0.3"]
    assert m.expected_records() == {"_blobstore._tcp.mesh.internal.": 4}
    assert m.pools() == {"blobstore": ["host-a", "host-b"]}


def test_plan_starts_responder_first_and_gives_each_host_its_runtime_dir(
    tmp_path: Path,
) -> None:
    m = load_manifest(ROOT / "deploy" / "local.toml")
    s = Settings.load(
        env={}, state_dir=tmp_path / "state", runtime_dir=tmp_path / "run"
    )
    specs = plan(m, s)
    assert specs[0].name == "responder"
    assert [p.name for p in specs[1:]] == [
        "host-a/blobstore-1",
        "host-a/blobstore-2",
        "host-b/blobstore-1",
        "host-b/blobstore-2",
    ]
    assert specs[1].env["MESH_RUNTIME_DIR"] == str(tmp_path / "run" / "host-a")
    assert specs[3].env["MESH_RUNTIME_DIR"] == str(tmp_path / "run" / "host-b")
    assert "127.0.0.3" in specs[3].argv
    assert specs[3].argv[specs[3].argv.index("--pool") + 1] == "blobstore"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("zone = 'x.'\n", "no \\[\\[hosts\\]\\]"),
        (
            "[[hosts]]\n[[hosts.services]]\nname='Bad_Name'\nhandler='a:B'\n",
            "not an RFC 6335 name",
        ),
        (
            "[[hosts]]\n[[hosts.services]]\nname='svc'\nhandler='nocolon'\n",
            "module:Class",
        ),
        (
            "[[hosts]]\n[[hosts.services]]\nname='svc'\nhandler='a:B'\nreplicas=-1\n",
            "replicas must be an integer",
        ),
        (
            "[[hosts]]\naddress='127.0.0.2'\n[[hosts]]\naddress='127.0.0.2'\n",
            "used by two hosts",
        ),
        ("zone = \n", "not valid TOML"),
    ],
)
def test_bad_manifests_name_the_mistake(
    tmp_path: Path, body: str, message: str
) -> None:
    path = tmp_path / "m.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_manifest(path)


@pytest.mark.parametrize(
    ("argv", "command", "ready_timeout", "verbose"),
    [
        (["m.toml", "--", "mesh", "workload", "-v"], ["mesh", "workload", "-v"], 60, 0),
        (
            ["m.toml", "--ready-timeout", "7", "-v", "--", "x", "--y"],
            ["x", "--y"],
            7,
            1,
        ),
        (["--ready-timeout", "5", "m.toml"], [], 5, 0),
        (["m.toml", "--ready-timeout", "9"], [], 9, 0),
    ],
)
def test_up_tells_its_options_from_the_command(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: list[str],
    command: list[str],
    ready_timeout: float,
    verbose: int,
) -> None:
    import mesh.deploy
    from mesh.cli import build_parser

    seen: dict[str, Any] = {}
    monkeypatch.setattr(mesh.deploy, "up", lambda m, s, **kw: seen.update(kw) or 0)
    (tmp_path / "m.toml").write_text(MANIFEST)
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["up", *argv])
    assert args.func(args) == 0
    assert seen["command"] == command
    assert seen["ready_timeout"] == ready_timeout
    assert seen["verbose"] == verbose


def test_up_refuses_a_command_it_cannot_tell_from_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mesh.cli import build_parser

    (tmp_path / "m.toml").write_text(MANIFEST)
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["up", "m.toml", "-v", "mesh", "workload"])
    with pytest.raises(ConfigError, match="after '--'"):
        args.func(args)


def test_mesh_up_stops_at_once_when_the_dns_port_is_taken(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        manifest = tmp_path / "m.toml"
        manifest.write_text(
            f'[responder]\nlisten = "127.0.0.1:{port}"\n'
            '[[hosts]]\n[[hosts.services]]\nname = "x"\nhandler = "a:B"\n'
        )
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mesh",
                "up",
                str(manifest),
                "--state-dir",
                str(tmp_path / "s"),
                "--runtime-dir",
                str(tmp_path / "r"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    assert "\nmesh up: cannot run the responder on 127.0.0.1:" in "\n" + out.stderr
    assert f"UDP port {port} is taken" in out.stderr
