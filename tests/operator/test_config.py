"""The operator's command line: config.FLAGS against docs/operator-runtime.md, flags and
MAILRELAY_OPERATOR_* variables into Options, and exit code 2 naming a bad setting."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailrelay_operator import cli, config

from tests import flagdocs

REPO = pathlib.Path(__file__).resolve().parents[2]
DOC, HEADING = REPO / "docs" / "operator-runtime.md", "## Flags"


def test_every_flag_has_a_row_and_every_row_a_flag() -> None:
    rows = flagdocs.flag_table(DOC, HEADING)
    names = {flag.name for flag in config.FLAGS}
    assert sorted(names - set(rows)) == [], "flags missing from docs/operator-runtime.md"
    assert sorted(set(rows) - names) == [], "rows for flags config.FLAGS does not have"


def test_documented_defaults_are_the_flag_defaults() -> None:
    rows = flagdocs.flag_table(DOC, HEADING)
    for flag in config.FLAGS:
        cell = rows[flag.name]
        if flag.switch:
            assert cell == ("on" if flag.default == "true" else "off"), flag.name
        elif flag.default is not None:
            assert cell == f"`{flag.default}`", f"{flag.name}: {flag.default}, the table says {cell}"
        else:
            assert cell and not cell.startswith("`--"), flag.name


def test_the_defaults_parse_to_the_options_defaults() -> None:
    assert cli.parse_args([], environ={}) == config.Options()


@pytest.mark.parametrize(
    ("argv", "environ", "field", "expected"),
    [
        ([], {"MAILRELAY_OPERATOR_NAMESPACE": "mail, billing"}, "namespaces", ("mail", "billing")),
        (["--namespace", "a", "--namespace", "b,c"], {"MAILRELAY_OPERATOR_NAMESPACE": "x"}, "namespaces",
         ("a", "b", "c")),
        ([], {"MAILRELAY_OPERATOR_STANDALONE": "true"}, "standalone", True),
        (["--standalone"], {}, "standalone", True),
        ([], {"MAILRELAY_OPERATOR_METRICS_PORT": "0"}, "metrics_port", None),
        (["--metrics-port", "9191"], {"MAILRELAY_OPERATOR_METRICS_PORT": "9000"}, "metrics_port", 9191),
        (["--liveness", ""], {}, "liveness", None),
        ([], {"MAILRELAY_OPERATOR_OPERATOR_NAMESPACE": "ops"}, "operator_namespace", "ops"),
        ([], {"MAILRELAY_OPERATOR_DELETE_WAIT_SECONDS": "12.5"}, "delete_wait_seconds", 12.5),
        ([], {"MAILRELAY_OPERATOR_RELAY_IMAGE": "r:1"}, "relay_image", "r:1"),
        ([], {"MAILRELAY_OPERATOR_OPERATOR_LABELS": "a=b, c=d"}, "operator_labels", {"a": "b", "c": "d"}),
        (["--log-format", "TEXT"], {}, "log_format", "text"),
        ([], {"MAILRELAY_OPERATOR_LOG_LEVEL": "debug"}, "log_level", "debug"),
    ],
)
def test_flags_and_variables(argv: list[str], environ: dict[str, str], field: str, expected: object) -> None:
    assert getattr(cli.parse_args(argv, environ=environ), field) == expected


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {"MAILRELAY_OPERATOR_METRICS_PORT": "abc"},
         "--metrics-port (MAILRELAY_OPERATOR_METRICS_PORT): expected an integer, got 'abc'"),
        (["--metrics-port", "70000"], {}, "--metrics-port: must be a port"),
        (["--relay-timeout", "0"], {}, "--relay-timeout: must be a finite number above 0"),
        ([], {"MAILRELAY_OPERATOR_API_TIMEOUT": "nan"}, "--api-timeout (MAILRELAY_OPERATOR_API_TIMEOUT)"),
        (["--api-retries", "0"], {}, "--api-retries: must be a finite number at least 1"),
        ([], {"MAILRELAY_OPERATOR_STANDALONE": "maybe"}, "--standalone (MAILRELAY_OPERATOR_STANDALONE)"),
        (["--log-level", "loud"], {}, "--log-level: must be one of debug, info, warning, error"),
        (["--operator-labels", "no-equals"], {}, "--operator-labels: expected key=value"),
        ([], {"MAILRELAY_OPERATOR_DELETE_WAIT_SECONDS": "-1"}, "--delete-wait-seconds"),
    ],
)
def test_a_bad_setting_exits_2_naming_it(argv: list[str], environ: dict[str, str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(argv, environ=environ)
    assert exited.value.code == 2
    assert f"mailrelay-operator: error: {message}" in capsys.readouterr().err


def test_the_command_exits_2_without_a_traceback() -> None:
    env = {**os.environ, "MAILRELAY_OPERATOR_METRICS_PORT": "abc"}
    done = subprocess.run([sys.executable, "-m", "mailrelay_operator.cli"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "MAILRELAY_OPERATOR_METRICS_PORT" in done.stderr and "Traceback" not in done.stderr


keys = st.text("abcdefghijklmnopqrstuvwxyz./-", min_size=1, max_size=20)
values = st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", max_size=20)


@given(st.dictionaries(keys, values, max_size=5))
def test_labels_read_back_what_was_written(labels: dict[str, str]) -> None:
    text = ",".join(f"{key}={value}" for key, value in labels.items())
    assert config.parse_labels("--operator-labels", text) == labels


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_logs_are_json_lines_by_default_and_text_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    options = cli.parse_args([], environ={})
    cli.setup_logging(options.log_level, options.log_format)
    # As Kopf logs about an object: its adapter adds `k8s_ref`.
    logging.getLogger("kopf.objects").warning(
        "Timer 'x' failed", extra={"k8s_ref": {"kind": "MailRelay", "namespace": "mail", "name": "r1"}})
    logging.getLogger("mailrelay_operator.scaling").debug("not at info level")
    (line,) = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"]) == ("warning", "kopf.objects")
    assert entry["event"] == "Timer 'x' failed"
    assert entry["object"] == {"kind": "MailRelay", "namespace": "mail", "name": "r1"}
    cli.setup_logging("debug", cli.parse_args(["--log-format", "text"], environ={}).log_format)
    logging.getLogger("mailrelay_operator.scaling").debug("a tick")
    text = capsys.readouterr().err
    assert "DEBUG mailrelay_operator.scaling: a tick" in text and not text.startswith("{")


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "mailrelay_operator.cli", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().startswith("mailrelay-operator ")


def test_no_cluster_is_a_message_not_a_traceback(tmp_path: pathlib.Path) -> None:
    """No --kubeconfig, no KUBECONFIG, no in-cluster service and no ~/.kube/config: one line saying so."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KUBE", "MAILRELAY_OPERATOR_"))} | {"HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "mailrelay_operator.cli", "--standalone", "--liveness", ""],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "mailrelay-operator: error: no Kubernetes cluster to talk to" in done.stderr
    assert "Traceback" not in done.stderr
