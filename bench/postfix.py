"""A private Postfix instance that relays from a loopback port to a smarthost on loopback.

It lives wholly in the run's folder: `postfix -c DIR/etc start` with its own main.cf and master.cf, its own
queue_directory, data_directory and `maillog_file` (no syslog). The system's /etc/postfix is only read for
the packaged `postfix-files` (meta_directory); the system Postfix, if any, is never started or stopped.

Settings are Postfix defaults except what makes it a loopback relay (relayhost, mynetworks, no local
delivery, no chroot) and `default_process_limit`, which the caller picks (the session cap).

What it must not do: write outside its folder, or leave a master process behind (stop() waits for it and
kills what is left).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import time

from bench import procs, workdir

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"

MASTER_CF = """\
# service type private unpriv chroot wakeup maxproc command
{listen} inet n - n - - smtpd
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def main_cf(root: pathlib.Path, upstream_port: int, process_limit: int) -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
myhostname = postfix-bench.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{upstream_port}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_process_limit = {process_limit}
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
biff = no
append_dot_mydomain = no
smtputf8_enable = no
"""


class Postfix:
    """`with Postfix(run, upstream_port, process_limit) as pf:` then send to 127.0.0.1:pf.port."""

    name = "postfix"

    def __init__(self, run: workdir.RunDir, upstream_port: int, process_limit: int, label: str = "postfix"):
        self.run = run
        self.root = run.sub(label)
        self.etc = self.root / "etc"
        self.upstream_port = upstream_port
        self.process_limit = process_limit
        self.port = procs.free_port()
        self.master_pid: int | None = None

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.etc), *args], capture_output=True, text=True, check=check, timeout=60
        )

    def running(self) -> bool:
        return self.etc.is_dir() and self._postfix("status", check=False).returncode == 0

    def start(self) -> Postfix:
        if self.running():  # idempotent: a second start() is a no-op
            return self
        for sub in ("etc", "queue", "data"):
            (self.root / sub).mkdir(mode=0o755, exist_ok=True)
        shutil.chown(self.root / "data", user="postfix")
        (self.etc / "main.cf").write_text(main_cf(self.root, self.upstream_port, self.process_limit))
        (self.etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        result = self._postfix("start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stderr.strip()} {self.log_tail()}")
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.master_pid = int(pid_file.read_text().split()[0])
        self.run.register(self.master_pid)
        procs.wait_for_greeting(self.port, timeout=30)
        return self

    def stop(self) -> None:
        if self.master_pid is None:
            return
        identities = [(pid, procs.start_time(pid)) for pid in procs.tree(self.master_pid)]
        self._postfix("stop", check=False)
        deadline = time.monotonic() + 20
        while procs.start_time(self.master_pid) == identities[0][1] and time.monotonic() < deadline:
            time.sleep(0.05)
        procs.kill_leftovers(identities)
        self.master_pid = None

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        return [] if self.master_pid is None else procs.tree(self.master_pid)

    def cpu_seconds(self) -> float:
        reaped = [] if self.master_pid is None else [self.master_pid]
        return procs.cpu_seconds(self.pids(), reaped_of=reaped)

    def sent_count(self) -> int:
        """Lines with status=sent in the instance's maillog (deliveries Postfix made to the smarthost)."""
        try:
            with open(self.root / "maillog", encoding="utf-8", errors="replace") as handle:
                return sum(1 for line in handle if " status=sent " in line)
        except OSError:
            return 0

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.root / "maillog").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
