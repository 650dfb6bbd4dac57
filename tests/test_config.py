from pathlib import Path

import pytest

from mesh.config import Settings, format_hostport, parse_hostport
from mesh.errors import ConfigError


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "mesh.toml"
    cfg.write_text(
        'zone = "file.example"\nlease = 12\nnameservers = ["127.0.0.9:53"]\n'
    )
    env = {"MESH_LEASE": "20", "MESH_NAMESERVERS": "127.0.0.1:5353, [::1]:5353"}
    s = Settings.load(cfg, env=env, lease=None, max_hits=7)
    assert s.zone == "file.example."
    assert s.lease == 20.0
    assert s.nameservers == ["127.0.0.1:5353", "[::1]:5353"]
    assert s.max_hits == 7


def test_unknown_setting_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown settings: bogus"):
        Settings.load(env={}, bogus=1)


def test_bad_values_are_clear() -> None:
    with pytest.raises(ConfigError, match="lease"):
        Settings.load(env={"MESH_LEASE": "soon"})
    with pytest.raises(ConfigError, match="out of range"):
        Settings.load(env={"MESH_NAMESERVERS": "127.0.0.1:70000"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", 53)),
        ("ns.example:53", ("ns.example", 53)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


def test_format_hostport_brackets_ipv6() -> None:
    assert format_hostport("::1", 5) == "[::1]:5"
    assert format_hostport("127.0.0.1", 5) == "127.0.0.1:5"


def test_responder_settings_defaults_and_environment() -> None:
    s = Settings.load(env={})
    assert (s.axfr_loopback, s.dns_max_tcp, s.dns_tcp_idle) == (True, 128, 3.0)
    env = {
        "MESH_AXFR_LOOPBACK": "false",
        "MESH_DNS_MAX_TCP": "4",
        "MESH_DNS_TCP_IDLE": "0.5",
    }
    s = Settings.load(env=env)
    assert (s.axfr_loopback, s.dns_max_tcp, s.dns_tcp_idle) == (False, 4, 0.5)
    # A flag (an override) beats the environment.
    assert Settings.load(env=env, axfr_loopback=True).axfr_loopback is True


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("MESH_AXFR_LOOPBACK", "perhaps", "axfr_loopback"),
        ("MESH_DNS_MAX_TCP", "0", "dns_max_tcp"),
        ("MESH_DNS_TCP_IDLE", "-1", "dns_tcp_idle"),
    ],
)
def test_bad_responder_settings_are_named(name: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings.load(env={name: value})


def test_report_commands_default_to_warning_unless_told() -> None:
    import logging

    from mesh.cli import build_parser, log_level

    for argv in (["workload"], ["broadcast", "--pool", "p", "x"]):
        args = build_parser().parse_args(argv)
        assert log_level(0, {}, args.log_default) == logging.WARNING
        assert log_level(1, {}, args.log_default) == logging.INFO
        assert log_level(0, {"MESH_LOG_LEVEL": "DEBUG"}, args.log_default) == 10
    assert log_level(0, {}) == logging.INFO
