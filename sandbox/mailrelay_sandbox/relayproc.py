"""Start and stop a real `mailrelay-relay` process for tests, the demo, the benchmark and the simulated
control plane: the one relay-process wrapper they all use.

What it is for: one small class, `RelayProcess`, that runs the real console script (or
`python -m mailrelay_relay.cli` when the script is not installed) on a chosen loopback address with
free ports, waits until it serves, and stops it the way Kubernetes would (SIGTERM, then wait) or the way
a crash would (SIGKILL). Its stderr (JSON log lines) goes to a file you can read back; its process tree
(supervisor and workers) can be read for CPU and memory, for the benchmark.

What it must not do: reach into the relay's internals (it only uses the CLI, the admin HTTP API and the
log file), or pick anything but loopback addresses.

API (everything is synchronous; wrap in `asyncio.to_thread` from async code)::

    from mailrelay_sandbox import relayproc

    relay = relayproc.RelayProcess(
        upstream=("127.0.0.1", 2526),       # or "127.0.0.1:2526"; required
        spool=tmp_path / "spool",           # created if missing; reuse it to test a restart
        host="127.0.0.5",                   # listen address for SMTP and admin (default 127.0.0.1)
        smtp_host=None,                     # another listen address for SMTP only (e.g. "::1")
        smtp_port=0, admin_port=0,          # 0 = pick a free port on its address
        token="s3cret",                     # None = no --admin-token-file (admin API open)
        workers=1,
        hostname="relay.test",              # --hostname (greeting and replies)
        extra_args=["--max-sessions", "5", "--drain-grace", "0.5"],
        env={"MAILRELAY_SPOOL_FAULT_FILE": "/tmp/fault"},   # added to the environment
        log_path=None,                      # default: <spool>/../relay-<port>.log
        startup_timeout=30.0,
    )
    relay.start()                           # returns once /readyz answers 200 (every worker listens)
    relay.smtp_address                      # ("127.0.0.5", 40123): (relay.smtp_host, relay.smtp_port)
    relay.admin_address                     # ("127.0.0.5", 40124)
    relay.admin_url                         # "http://127.0.0.5:40124"
    relay.status()                          # GET /status as a dict (sends the token)
    relay.drain(); relay.resume()           # POST /drain, /resume; return the status dict
    relay.get("/readyz")                    # (http status, body text) for any admin path
    relay.request("POST", "/drain")         # the same for any method (sends the token)
    relay.healthy()                         # /healthz answers 200
    relay.metrics()                         # /metrics text
    relay.stop(timeout=60.0)                # SIGTERM, wait; returns the exit code (drain, then exit)
    relay.kill()                            # SIGKILL, wait; returns the exit code (-9)
    relay.signal_group(signal.SIGTERM)      # a signal to the supervisor and every worker, no wait
    relay.restart()                         # start again with the same ports, spool and flags
    relay.log_text(); relay.log_events()    # the log file, raw / as a list of JSON dicts
    relay.pid, relay.running
    relay.pids(); relay.cpu_seconds(); relay.rss_bytes()   # the process tree, its CPU and memory

`RelayProcess` is also a context manager (`with RelayProcess(...) as relay:`) that starts on enter and,
on exit, stops with SIGTERM (bounded by `stop_timeout`, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from mailrelay_sandbox import netutil, proctree

free_port = netutil.free_port  # kept for tests/operator, which calls it by this name


def relay_command() -> list[str]:
    """The command that runs the relay: the venv's console script, else `python -m`."""
    script = pathlib.Path(sys.executable).parent / "mailrelay-relay"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mailrelay_relay.cli"]


class RelayProcess:
    def __init__(
        self,
        *,
        upstream: tuple[str, int] | str,
        spool: pathlib.Path | str,
        host: str = "127.0.0.1",
        smtp_host: str | None = None,
        smtp_port: int = 0,
        admin_port: int = 0,
        token: str | None = None,
        workers: int = 1,
        hostname: str = "relay.test",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: pathlib.Path | str | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.smtp_host = smtp_host or host
        self.upstream = upstream if isinstance(upstream, str) else f"{upstream[0]}:{upstream[1]}"
        self.spool = pathlib.Path(spool)
        self.smtp_port = smtp_port or netutil.free_port(self.smtp_host)
        self.admin_port = admin_port or netutil.free_port(host)
        self.token = token
        self.workers = workers
        self.hostname = hostname
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = pathlib.Path(log_path) if log_path else \
            self.spool.parent / f"relay-{self.smtp_host}-{self.smtp_port}.log"
        self._token_file: pathlib.Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- addresses --------------------------------------------------------------------------------------
    @property
    def smtp_address(self) -> tuple[str, int]:
        return (self.smtp_host, self.smtp_port)

    @property
    def admin_address(self) -> tuple[str, int]:
        return (self.host, self.admin_port)

    @property
    def admin_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.admin_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        smtp_host = f"[{self.smtp_host}]" if ":" in self.smtp_host else self.smtp_host
        args = [
            *relay_command(),
            "--listen", f"{smtp_host}:{self.smtp_port}",
            "--admin-listen", f"{host}:{self.admin_port}",
            "--upstream", self.upstream,
            "--spool", str(self.spool),
            "--hostname", self.hostname,
            "--workers", str(self.workers),
        ]
        if self._token_file is not None:
            args += ["--admin-token-file", str(self._token_file)]
        return args + self.extra_args

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self) -> RelayProcess:
        if self.running:
            raise RuntimeError("relay already running")
        if self.token is not None and self._token_file is None:
            self._token_file = self.log_path.with_suffix(".token")
            self._token_file.unlink(missing_ok=True)
            fd = os.open(self._token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(self.token + "\n")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILRELAY_")}
        environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        environ.update(self.env)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environ,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"mailrelay-relay exited with {self.process.returncode} during start-up:\n"
                    + self.log_text()[-4000:])
            with contextlib.suppress(OSError):
                # /readyz is 200 only once SMTP listens (with --workers N: once every worker listens);
                # a fresh process is never draining. Works at any --log-level.
                code, _ = self.get("/readyz", timeout=1.0)
                if code == 200:
                    return
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"mailrelay-relay not ready after {self.startup_timeout}s:\n"
                           + self.log_text()[-4000:])

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM (the relay drains, then exits), wait; SIGKILL after `timeout`. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout if timeout is not None else self.stop_timeout)
            except subprocess.TimeoutExpired:
                return self.kill()
        return int(self.process.returncode)

    def kill(self) -> int:
        """SIGKILL the whole process group (supervisor and workers), wait. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        else:  # the leader is gone; make sure no worker is left behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        return int(self.process.returncode)

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the supervisor and every worker (the process group); do not wait."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def restart(self) -> RelayProcess:
        if self.running:
            self.stop()
        return self.start()

    def close(self) -> None:
        if self.running:
            self.stop()
        if self._token_file is not None:
            self._token_file.unlink(missing_ok=True)
            self._token_file = None

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- admin API --------------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, timeout: float = 10.0) -> tuple[int, str]:
        headers = {}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.admin_url + path, method=method, headers=headers,
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return int(response.status), response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode("utf-8", "replace")

    def get(self, path: str, *, timeout: float = 10.0) -> tuple[int, str]:
        return self.request("GET", path, timeout=timeout)

    def _json(self, method: str, path: str) -> dict[str, Any]:
        code, body = self.request(method, path)
        if code != 200:
            raise RuntimeError(f"{method} {path}: HTTP {code}: {body[:200]}")
        result: dict[str, Any] = json.loads(body)
        return result

    def healthy(self) -> bool:
        """/healthz answers 200 (False when it does not answer at all)."""
        try:
            return self.get("/healthz", timeout=2.0)[0] == 200
        except OSError:
            return False

    def status(self) -> dict[str, Any]:
        return self._json("GET", "/status")

    def drain(self) -> dict[str, Any]:
        return self._json("POST", "/drain")

    def resume(self) -> dict[str, Any]:
        return self._json("POST", "/resume")

    def metrics(self) -> str:
        code, body = self.get("/metrics")
        if code != 200:
            raise RuntimeError(f"/metrics: HTTP {code}")
        return body

    # -- processes --------------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """The supervisor and every live worker ([] when not started)."""
        return [] if self.process is None else proctree.tree(self.process.pid)

    def cpu_seconds(self) -> float:
        """User+system CPU of the tree, the workers already reaped by the supervisor included."""
        reaped = [] if self.process is None else [self.process.pid]
        return proctree.cpu_seconds(self.pids(), reaped_of=reaped)

    def rss_bytes(self) -> int:
        """Resident memory of the supervisor and its workers, in bytes."""
        rss_kib, _ = proctree.memory_kib(self.pids())
        return rss_kib * 1024

    # -- logs -------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self, *, since_start: bool = False) -> list[dict[str, Any]]:
        """The JSON log lines (non-JSON lines are skipped); `since_start`: only since the last start()."""
        try:
            with open(self.log_path, "rb") as handle:
                if since_start:
                    handle.seek(self._log_offset)
                data = handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        events = []
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events
