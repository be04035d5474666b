"""The `mailrelay-relay` command: flags and `MAILRELAY_*` variables in, a running relay out.

What it is for: argparse set-up from config.FLAGS (a flag wins over its variable, which wins over the
default), reading the secret files the flags name, and exit code 2 with a clear message for anything
invalid. Then it hands over to app.run().

What it must not do: hold relay behaviour, or print a secret (token, password) anywhere.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import ssl
import sys
import tempfile
from collections.abc import Mapping, Sequence

from mailrelay_common import flags

from mailrelay_relay import __version__, config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailrelay-relay",
        description="A drain-aware SMTP relay that spools every message durably before answering 250.",
        epilog="Every flag also reads an environment variable: --max-sessions is MAILRELAY_MAX_SESSIONS; "
        "a repeatable flag takes a comma-separated list from its variable.",
    )
    parser.add_argument("--version", action="version", version=f"mailrelay-relay {__version__}")
    flags.add_arguments(parser, config.FLAGS)
    return parser


def gather(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, flags.RawValue]:
    """Flag values, else environment values, keyed by Flag.dest (None where neither is set)."""
    return flags.gather(args, environ, config.FLAGS)


def default_hostname() -> str:
    """The host's FQDN, or its plain name when the FQDN lookup only finds localhost (e.g. in a pod)."""
    name = socket.getfqdn()
    if not name or name.startswith("localhost"):
        name = socket.gethostname() or "localhost"
    return name


def read_secret(flag: str, path: pathlib.Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise config.ConfigError(f"{flag}: cannot read {str(path)!r}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise config.ConfigError(f"{flag}: {str(path)!r} is not UTF-8 text") from None
    if not text:
        raise config.ConfigError(f"{flag}: {str(path)!r} is empty")
    return text


def check_readable(flag: str, path: pathlib.Path | None) -> None:
    if path is not None and not os.access(path, os.R_OK):
        raise config.ConfigError(f"{flag}: cannot read {str(path)!r}")


def check_ca_file(path: pathlib.Path | None) -> None:
    """--upstream-ca-file must hold at least one PEM certificate (caught here, not at the first delivery)."""
    if path is None:
        return
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:  # before OSError, of which it is a subclass
        raise config.ConfigError(f"--upstream-ca-file: {str(path)!r} holds no PEM certificate") from None
    except OSError as error:
        raise config.ConfigError(f"--upstream-ca-file: cannot read {str(path)!r}: {error.strerror}") from None


def metrics_dir() -> str | None:
    """A new private folder for the workers' metrics files: in the temporary directory, else in /dev/shm
    (a tmpfs in most containers even when the root is read-only); None when neither is writable."""
    try:
        return tempfile.mkdtemp(prefix="mailrelay-metrics-")
    except OSError:  # FileNotFoundError: "No usable temporary directory found"
        pass
    try:
        return tempfile.mkdtemp(prefix="mailrelay-metrics-", dir="/dev/shm")
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        values = gather(args, os.environ)
        fallback = "" if values["hostname"] else default_hostname()
        cfg = config.from_values(values, default_hostname=fallback)
        token = read_secret("--admin-token-file", cfg.admin_token_file)
        password = read_secret("--upstream-password-file", cfg.upstream_password_file)
        check_readable("--tls-cert", cfg.tls_cert)
        check_ca_file(cfg.upstream_ca_file)
        check_readable("--tls-key", cfg.tls_key)
        if cfg.spool.exists() and not cfg.spool.is_dir():
            raise config.ConfigError(f"--spool: {str(cfg.spool)!r} is not a directory")
    except config.ConfigError as error:
        parser.print_usage(sys.stderr)
        print(f"mailrelay-relay: error: {error}", file=sys.stderr)
        return 2
    if cfg.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before anything imports prometheus_client (metrics.py docstring): one coherent /metrics.
        directory = metrics_dir()
        if directory is None:
            print("mailrelay-relay: error: --workers above 1 needs a writable folder for the workers' "
                  "metrics, and neither the temporary directory (TMPDIR, /tmp) nor /dev/shm is writable: "
                  "with a read-only root filesystem mount a tmpfs on /tmp (the chart does), or set "
                  "PROMETHEUS_MULTIPROC_DIR to an empty writable folder", file=sys.stderr)
            return 2
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        os.environ["MAILRELAY_OWN_METRICS_DIR"] = directory
    from mailrelay_relay import app  # imported late: after the metrics mode is chosen

    return app.run(cfg, token=token, upstream_password=password)


if __name__ == "__main__":
    sys.exit(main())
