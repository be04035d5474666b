"""The `mailrelay-relay` command line: flags, MAILRELAY_* variables, defaults, and exit code 2."""

from __future__ import annotations

import ipaddress
import os
import pathlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_relay import cli, config
from mailrelay_sandbox import relayproc


def parse(argv: list[str], env: dict[str, str] | None = None) -> config.Config:
    args = cli.build_parser().parse_args(argv)
    return config.from_values(cli.gather(args, env or {}), default_hostname="host.test")


def test_defaults_follow_the_contract_and_are_not_an_open_relay() -> None:
    cfg = parse(["--upstream", "smarthost.test:25"])
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 2525)
    assert (cfg.admin_host, cfg.admin_port) == ("0.0.0.0", 8025)
    assert cfg.accept_from == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert (cfg.max_sessions, cfg.max_message_size, cfg.max_recipients, cfg.max_inflight_bytes) == (
        200, 26214400, 100, 268435456)
    assert (cfg.drain_timeout, cfg.queue_lifetime, cfg.workers, cfg.upstream_tls) == (
        600.0, 432000.0, 1, "none")
    assert cfg.hostname == "host.test" and cfg.spool == pathlib.Path("/var/spool/mailrelay")
    assert cfg.tls_cert is None and cfg.admin_token_file is None


def test_flag_beats_variable_beats_default() -> None:
    env = {"MAILRELAY_UPSTREAM": "up.test:2525", "MAILRELAY_MAX_SESSIONS": "7",
           "MAILRELAY_ACCEPT_FROM": "10.0.0.0/8,192.168.0.0/16"}
    cfg = parse(["--max-sessions", "9"], env)
    assert cfg.upstream_host == "up.test" and cfg.max_sessions == 9
    assert cfg.accept_from == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.0.0/16"))
    repeated = parse(["--accept-from", "10.1.0.0/16", "--accept-from", "::1/128,127.0.0.1/32"], env)
    assert [str(n) for n in repeated.accept_from] == ["10.1.0.0/16", "::1/128", "127.0.0.1/32"]
    v6 = parse(["--listen", "[::1]:2600", "--admin-listen", "::1:2601"], env)
    assert (v6.listen_host, v6.listen_port, v6.admin_host, v6.admin_port) == ("::1", 2600, "::1", 2601)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--upstream is required"),
        (["--upstream", "nohost"], "--upstream: expected HOST:PORT"),
        (["--upstream", "h:99999"], "--upstream: port must be 0..65535"),
        (["--upstream", "h:25", "--listen", "h:x"], "--listen: port must be 0..65535"),
        (["--upstream", "h:25", "--max-sessions", "0"], "--max-sessions: must be at least 1"),
        (["--upstream", "h:25", "--max-sessions", "many"], "--max-sessions: expected an integer"),
        (["--upstream", "h:25", "--accept-from", "10.0.0.0/33"], "--accept-from: not a CIDR network"),
        (["--upstream", "h:25", "--upstream-tls", "ssl"],
         "--upstream-tls: must be one of none, starttls, tls"),
        (["--upstream", "h:25", "--tls-cert", "/x.pem"], "--tls-cert and --tls-key must be given together"),
        (["--upstream", "h:25", "--drain-timeout", "-1"], "--drain-timeout: must be a finite number >= 0"),
        (["--upstream", "h:25", "--drain-timeout", "nan"], "--drain-timeout: must be a finite number"),
        (["--upstream", "h:25", "--hostname", "bad host"], "--hostname: not a valid host name"),
        (["--upstream", "h:25", "--upstream-password-file", "/p"],
         "--upstream-password-file needs --upstream-user"),
    ],
)
def test_invalid_values_raise_a_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(config.ConfigError) as raised:
        parse(argv)
    assert message in str(raised.value)


@given(host=st.sampled_from(["127.0.0.1", "relay.example", "::1", "fe80::1"]), port=st.integers(0, 65535))
def test_hostport_round_trip(host: str, port: int) -> None:
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert config.parse_hostport("--listen", text) == (host, port)


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILRELAY_")}
    environ.update(env or {})
    return subprocess.run([*relayproc.relay_command(), *args], capture_output=True, text=True, timeout=60,
                          env=environ, check=False)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--upstream", "h:25", "--workers", "0"], {}, "--workers: must be at least 1"),
        ([], {"MAILRELAY_UPSTREAM": "h:25", "MAILRELAY_MAX_RECIPIENTS": "lots"},
         "--max-recipients: expected an integer"),
        (["--upstream", "h:25", "--admin-token-file", "/nonexistent/token"], {},
         "--admin-token-file: cannot read '/nonexistent/token'"),
        (["--upstream", "h:25", "--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    ],
)
def test_cli_exits_2_with_a_message(args: list[str], env: dict[str, str], message: str) -> None:
    result = run_cli(args, env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_refuses_an_empty_token_file(tmp_path: pathlib.Path) -> None:
    token = tmp_path / "token"
    token.write_text("  \n")
    result = run_cli(["--upstream", "h:25", "--admin-token-file", str(token)])
    assert result.returncode == 2 and "is empty" in result.stderr


def test_cli_help_lists_every_flag_with_its_variable() -> None:
    result = run_cli(["--help"])
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in config.FLAGS:
        assert flag.name in text and flag.env in text


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "mailrelay_relay.cli", "--version"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.startswith("mailrelay-relay ")
