"""Upstream security settings on the real command line: a private CA for upstream TLS
(--upstream-ca-file) and the refusal of AUTH in clear (--upstream-user with --upstream-tls none)
unless --upstream-allow-plaintext-auth says so."""

from __future__ import annotations

import os
import pathlib
import smtplib
import subprocess
import sys

import pytest
from mailrelay_relay import cli, config
from mailrelay_sandbox import relayproc, waiting
from mailrelay_sandbox import sink as sinkmod

from tests.conftest import require_tool
from tests.relay import relay_harness

WAIT = 60.0


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILRELAY_")}
    environ.update(env or {})
    return subprocess.run([*relayproc.relay_command(), *args], capture_output=True, text=True, timeout=60,
                          env=environ, stdin=subprocess.DEVNULL, check=False)


def send(relay: relayproc.RelayProcess, subject: str) -> None:
    _, content = relay_harness.message(subject)
    with smtplib.SMTP(*relay.smtp_address, timeout=30) as client:
        client.sendmail("a@client.test", ["b@dest.test"], content)


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A private CA and a server certificate it signed for 127.0.0.1, made by openssl."""
    openssl = require_tool("openssl")
    d = tmp_path_factory.mktemp("private-ca")
    files = {name: str(d / f"{name}.pem") for name in ("ca", "ca-key", "cert", "key", "csr")}

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", "/CN=mailrelay test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", files["ca-key"], "-out", files["ca"])
    run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", "/CN=upstream.test",
        "-keyout", files["key"], "-out", files["csr"])
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                   "basicConstraints=CA:FALSE\n", encoding="ascii")
    run("x509", "-req", "-in", files["csr"], "-CA", files["ca"], "-CAkey", files["ca-key"],
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", files["cert"])
    return files


@pytest.mark.parametrize("tls", ["starttls", "tls"])
def test_upstream_ca_file_trusts_a_private_ca(tmp_path: pathlib.Path, private_ca: dict[str, str],
                                              tls: str) -> None:
    with sinkmod.running(tls=tls, certfile=private_ca["cert"], keyfile=private_ca["key"]) as sink:
        trusting = relay_harness.start_relay(
            tmp_path, sink.address, name="trusting",
            args=["--upstream-tls", tls, "--upstream-ca-file", private_ca["ca"]])
        # The same upstream without the CA (once, to keep the suite short): the certificate cannot be
        # verified against the system CAs, so nothing is sent.
        untrusting = relay_harness.start_relay(tmp_path, sink.address, name="untrusting",
                                               args=["--upstream-tls", tls]) if tls == "starttls" else None
        try:
            if untrusting is not None:
                send(untrusting, "no-ca")
            send(trusting, "private-ca")
            assert sink.wait_for(1, timeout=WAIT)
            if untrusting is not None:
                unattempted = 'mailrelay_relay_delivery_attempts_total{result="connection_error"} 0.0'
                waiting.wait_until(lambda: unattempted not in untrusting.metrics(), within=WAIT,
                                   what="a failed delivery attempt by the relay that does not trust the CA")
                assert untrusting.status()["queue"]["messages"] == 1
            assert trusting.stop() == 0
            assert [b"Subject: private-ca" in m.content for m in sink.messages] == [True]
        finally:
            trusting.kill() if trusting.running else None
            if untrusting is not None:
                untrusting.kill()


def test_upstream_ca_file_is_checked_at_start(tmp_path: pathlib.Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n", encoding="ascii")
    base = ["--upstream", "127.0.0.1:25", "--spool", str(tmp_path / "spool")]
    cases = [
        (["--upstream-tls", "starttls", "--upstream-ca-file", str(not_pem)], "holds no PEM certificate"),
        (["--upstream-tls", "tls", "--upstream-ca-file", str(tmp_path / "missing.pem")], "cannot read"),
        (["--upstream-ca-file", str(not_pem)], "--upstream-ca-file needs --upstream-tls starttls or tls"),
    ]
    for args, message in cases:
        result = run_cli(base + args)
        assert result.returncode == 2, result
        assert message in result.stderr


def test_plaintext_auth_is_refused_at_start(tmp_path: pathlib.Path) -> None:
    password = tmp_path / "password"
    password.write_text("hunter2\n", encoding="ascii")
    base = ["--upstream", "127.0.0.1:25", "--spool", str(tmp_path / "spool"),
            "--upstream-user", "relay", "--upstream-password-file", str(password)]
    for env in ({}, {"MAILRELAY_UPSTREAM_TLS": "none"}, {"MAILRELAY_UPSTREAM_ALLOW_PLAINTEXT_AUTH": "false"}):
        result = run_cli(base, env)
        assert result.returncode == 2, result
        assert "--upstream-tls none would send the AUTH password in clear" in result.stderr
        assert "--upstream-allow-plaintext-auth" in result.stderr
        assert "hunter2" not in result.stderr + result.stdout
    assert not (tmp_path / "spool").exists()  # refused before anything started
    bad = run_cli(base, {"MAILRELAY_UPSTREAM_ALLOW_PLAINTEXT_AUTH": "maybe"})
    assert bad.returncode == 2 and "--upstream-allow-plaintext-auth: expected true or false" in bad.stderr


def test_plaintext_auth_when_explicitly_allowed(tmp_path: pathlib.Path) -> None:
    password = tmp_path / "password"
    password.write_text("pw\n", encoding="ascii")
    args = ["--upstream-user", "relay", "--upstream-password-file", str(password)]
    by_variable = cli.build_parser().parse_args(args)
    cfg = config.from_values(cli.gather(by_variable, {"MAILRELAY_UPSTREAM": "127.0.0.1:25",
                                                      "MAILRELAY_UPSTREAM_ALLOW_PLAINTEXT_AUTH": "true"}),
                             default_hostname="h")
    assert cfg.upstream_allow_plaintext_auth and cfg.upstream_user == "relay"
    with sinkmod.running(auth=("relay", "pw")) as sink:
        relay = relay_harness.start_relay(tmp_path, sink.address,
                                          args=[*args, "--upstream-allow-plaintext-auth"])
        try:
            send(relay, "plain-auth")
            assert sink.wait_for(1, timeout=WAIT)
        finally:
            relay.stop()


def test_help_lists_the_new_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "mailrelay_relay.cli", "--help"], capture_output=True,
                            text=True, timeout=60, check=True)
    for name in ("--upstream-ca-file", "--upstream-allow-plaintext-auth"):
        assert name in result.stdout
