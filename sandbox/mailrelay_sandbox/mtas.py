"""Client MTAs run as a user's applications run them, each with a private configuration: the queueing mail
servers (Postfix, Exim, OpenSMTPD, nullmailer, dma) that hand mail to a relay, and msmtp, which has no
queue.

What it is for: the relay's tests drive real MTAs against a relay that drains, is at its session cap, or
answers 4xx (tests/relay/test_mta_clients.py), and the benchmark runs a private Postfix as a loopback
relay (bench/postfix.py). One class per MTA (`CLIENTS`), all with the same shape:

    with mtas.scratch() as folder:         # a folder the MTAs' own users can reach; cleaned up after
        mta = mtas.Exim(folder / "exim", upstream=("127.0.0.5", 2525))   # the smarthost it relays to
        mtas.Exim.missing()              # None, or what is not installed (scripts/install-system-deps.sh)
        mta.start()                      # private configuration, spool and logs under its folder
        mta.submit(mtas.message("hi"))   # as an application would (sendmail interface or SMTP)
        mta.flush()                      # force a queue run now instead of waiting out the MTA's backoff
        mta.queued()                     # messages (dma: recipient entries) still in its queue
        mta.deferred()                   # ... of which it tried and now waits to retry (its own account)
        mta.log_text(), mta.state_text() # its log; its processes and queue files (for a failing test)
        mta.stop()                       # stops every process it started
    mtas.Msmtp(folder, upstream).send(msg)   # msmtp: (exit code, output)

Where they come from: Postfix and msmtp are Debian packages installed on the machine. Exim
(exim4-daemon-light), OpenSMTPD, nullmailer and dma conflict with Postfix as system installs, so
scripts/install-system-deps.sh unpacks their Debian packages (`dpkg -x`) into .tools/mta/<package>/.

How each stays private (the machine's /etc, spool folders and port 25 are never touched):
- Postfix: `postfix -c <folder>/etc`, with its own main.cf, master.cf, queue_directory, data_directory
  and maillog_file (the system's /etc/postfix is only read for the packaged postfix-files); `postqueue
  -c <folder>/etc -f` flushes it.
- nullmailer: NULLMAILER_TEST_PREFIX=<folder> moves its configuration, queue and helpers into the
  folder; writing to its trigger (a FIFO) makes nullmailer-send try everything at once.
- Exim, OpenSMTPD, dma: compiled-in paths and users (Debian-exim; opensmtpd and opensmtpq; /etc/dma/
  dma.conf) that no option moves, so each runs in a private mount and PID namespace (`Namespace`):
  overlay mounts put a private upper layer over /etc (and /var/spool, /var/lib, /run, /dev where
  needed), so the users, configuration files and queue folders exist only inside it. When the
  namespace's first process ends, the kernel ends every process in it, daemons included, and the
  mounts go with it.
  Exim runs with `-C <file>` (listed in the namespace's /etc/exim4/trusted_configs), never as a daemon
  (`-bd`): mail is submitted with `-odi` (delivered at once, in the foreground) and queue runs are
  forced with `-qf`. OpenSMTPD runs as `smtpd -d -f <file>`; `smtpctl schedule all` forces its queue.
  dma's queue run is `dma -q`; its syslog lines reach a socket of ours bound at the namespace's /dev/log.

Needs root (mount namespaces, Postfix's set-up), as CI runs.

What it must not do: write outside the folder it is given (and the namespace's private layers), listen
anywhere but on a free loopback port, or leave a process behind: stop() ends every process the MTA
started, a namespace ends when the process that made it goes even if stop() is never called, and
`scratch()` kills what still works in its folder and removes what a killed run left (`sweep`).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import grp
import json
import os
import pathlib
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

from mailrelay_sandbox import netutil

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = REPO_ROOT / ".tools" / "mta"  # `dpkg -x` trees, by scripts/install-system-deps.sh

SENDER = "app@client.test"
RECIPIENT = "user@dest.test"
TIMEOUT = 60.0  # generous: a loaded 2-core machine


class MTAError(RuntimeError):
    """An MTA could not be set up, or a command of it failed."""


@dataclasses.dataclass(frozen=True)
class Message:
    msg_id: str  # "<...@client.test>"
    content: bytes  # CRLF line ends
    sender: str
    recipients: tuple[str, ...]

    def lf_content(self) -> bytes:
        """The content with LF line ends, as the sendmail interface reads it."""
        return self.content.replace(b"\r\n", b"\n")


def message(subject: str = "test", *, sender: str = SENDER,
            recipients: Sequence[str] = (RECIPIENT,)) -> Message:
    """A small RFC 5322 message with a unique Message-ID."""
    msg_id = f"<{uuid.uuid4().hex}@client.test>"
    text = (f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n"
            f"Message-ID: {msg_id}\r\n\r\nhello\r\n")
    return Message(msg_id, text.encode("ascii"), sender, tuple(recipients))


def message_id(content: bytes) -> str | None:
    """The Message-ID header of `content` (as received by a sink), or None."""
    match = re.search(rb"^message-id:[ \t]*(\S+)", content, re.IGNORECASE | re.MULTILINE)
    return match.group(1).decode("ascii", "replace") if match else None


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _comm(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of a process, or None when it is gone."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[19])


def _sleeping(pid: int) -> bool:
    """True when the process is blocked in nanosleep or clock_nanosleep (sleep(3): a backoff)."""
    try:
        number = pathlib.Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False
    return number in ("35", "230")  # x86_64: nanosleep, clock_nanosleep


def processes_in(folder: pathlib.Path) -> list[tuple[int, int]]:
    """(pid, start time) of every process whose working directory is `folder` or below it."""
    out: list[tuple[int, int]] = []
    root = str(folder.resolve())
    for pid in _pids():
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        state = _state(pid)
        if state is not None and (cwd == root or cwd.startswith(root + "/")):
            out.append((pid, state[1]))
    return out


def kill_all(identities: Sequence[tuple[int, int]]) -> None:
    """SIGKILL each (pid, start time) that is still that process (never a reused pid)."""
    for pid, started in identities:
        state = _state(pid)
        if state is not None and state[1] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


SCRATCH_PREFIX = "mailrelay-mta-"


@contextlib.contextmanager
def scratch() -> Iterator[pathlib.Path]:
    """A folder for MTAs under the system's temporary folder that their own users (postfix, Debian-exim,
    mail) can reach, which pytest's private temporary folders are not. On exit every process working in
    it is killed and it is removed; what a run that died left behind is cleaned up first (`sweep`)."""
    sweep()
    folder = pathlib.Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    folder.chmod(0o755)
    state = _state(os.getpid())
    (folder / "owner").write_text(f"{os.getpid()} {state[1] if state else 0}\n")
    try:
        yield folder
    finally:
        kill_all(processes_in(folder))
        shutil.rmtree(folder, ignore_errors=True)


def sweep() -> list[pathlib.Path]:
    """Kill the processes of, and remove, every scratch folder whose owner process is gone (a test run
    that was killed). Returns the folders removed."""
    removed = []
    for folder in pathlib.Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            pid, started = (int(f) for f in (folder / "owner").read_text().split())
        except (OSError, ValueError):
            continue
        state = _state(pid)
        if state is not None and state[1] == started:
            continue  # its run is still going
        kill_all(processes_in(folder))
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def free_ids(count: int) -> list[int]:
    """`count` numbers that are neither a uid nor a gid on this machine (users of a namespace)."""
    used = {entry.pw_uid for entry in pwd.getpwall()} | {entry.gr_gid for entry in grp.getgrall()}
    out = [n for n in range(64000, 65000) if n not in used][:count]
    if len(out) < count:
        raise MTAError("no free uid/gid numbers between 64000 and 65000")
    return out


# -- a private mount and PID namespace --------------------------------------------------------------

_INIT = """\
import os, select, sys
lifeline = int(sys.argv[1])
while True:
    ready, _, _ = select.select([lifeline], [], [], 1.0)
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    if ready and not os.read(lifeline, 1):
        sys.exit(0)
"""


class Namespace:
    """A private mount and PID namespace whose overlays give chosen system folders a private upper layer.

    `layers` maps a system folder (/etc, /var/spool, ...) to files to put in its private layer (path
    relative to that folder -> content); the machine's folder shows through everywhere else. With
    `syslog=True`, /dev/log inside is a datagram socket of ours and what arrives is kept (`syslog_lines`).
    Its first process (an init that reaps orphans) exits when stop() is called or when the process that
    started it is gone (a pipe it holds closes); the kernel then kills every process in the namespace.
    """

    def __init__(self, folder: pathlib.Path, layers: Mapping[str, Mapping[str, str]], *,
                 syslog: bool = False) -> None:
        self.folder = folder
        self.layers = layers
        self.syslog = syslog
        self.syslog_lines: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None
        self._log_sock: socket.socket | None = None
        self._log_thread: threading.Thread | None = None
        self.init_pid = 0
        self._ns = ""

    def _layer(self, target: str) -> pathlib.Path:
        return self.folder / ("layer" + target.replace("/", "-"))

    def start(self) -> Namespace:
        if os.geteuid() != 0:
            raise MTAError("a private mount namespace needs root")
        self.folder.mkdir(parents=True, exist_ok=True)
        script = ["set -e"]
        targets = list(self.layers) + (["/dev"] if self.syslog and "/dev" not in self.layers else [])
        for target in targets:
            layer = self._layer(target)
            (layer / "upper").mkdir(parents=True, exist_ok=True)
            (layer / "work").mkdir(parents=True, exist_ok=True)
            for relative, content in self.layers.get(target, {}).items():
                path = layer / "upper" / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
            options = f"lowerdir={target},upperdir={layer / 'upper'},workdir={layer / 'work'}"
            script.append(f"mount -t overlay mailrelay-mta -o {shlex.quote(options)} {shlex.quote(target)}")
        if self.syslog:
            sock_path = self.folder / "log.sock"
            sock_path.unlink(missing_ok=True)
            self._log_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._log_sock.bind(str(sock_path))
            sock_path.chmod(0o666)
            self._log_thread = threading.Thread(target=self._read_syslog, args=(self._log_sock,),
                                                name="mta-syslog", daemon=True)
            self._log_thread.start()
            script += ["touch /dev/log", f"mount --bind {shlex.quote(str(sock_path))} /dev/log"]
        read_end, self._lifeline = os.pipe()
        script += ["echo ready", f'exec {shlex.quote(sys.executable)} -c "$1" {read_end}']
        try:
            self._proc = subprocess.Popen(
                ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
                 "--propagation", "private", "sh", "-c", "\n".join(script), "sh", _INIT],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(read_end,),
            )
        finally:
            os.close(read_end)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != b"ready":
            err = self._proc.stderr.read() if self._proc.stderr else b""
            self.stop()
            raise MTAError(f"the namespace did not start: {line!r} {err.decode(errors='replace')}")
        children = pathlib.Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children").read_text().split()
        self.init_pid = int(children[0])
        self._ns = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        return self

    def _read_syslog(self, sock: socket.socket) -> None:
        with open(self.folder / "syslog", "a", encoding="utf-8") as out:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                line = data.decode("utf-8", "replace").rstrip("\n")
                self.syslog_lines.append(line)
                out.write(line + "\n")
                out.flush()

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace (mounts and PIDs), as a command line for this machine."""
        if not self.init_pid:
            raise MTAError("the namespace is not running")
        return ["nsenter", f"--target={self.init_pid}", "--mount", "--pid", "--", *argv]

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(self.command(argv), input=stdin, capture_output=True, timeout=TIMEOUT,
                                check=False)
        if check and result.returncode != 0:
            raise MTAError(f"{' '.join(argv)} exited with {result.returncode}: "
                           f"{result.stderr.decode(errors='replace').strip()}")
        return result

    def popen(self, argv: Sequence[str], log: pathlib.Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(self.command(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)

    def pids(self) -> list[int]:
        """Pids (on this machine) of the live processes in the namespace, its init and zombies (the init
        reaps them within a second) left out."""
        if not self._ns:
            return []
        out = []
        for pid in _pids():
            if pid == self.init_pid:
                continue
            try:
                same = os.readlink(f"/proc/{pid}/ns/pid") == self._ns
            except OSError:
                continue
            state = _state(pid)
            if same and state is not None and state[0] != "Z":
                out.append(pid)
        return out

    def stop(self) -> None:
        if self._lifeline is not None:
            os.close(self._lifeline)  # the init exits, and the kernel kills the rest of the namespace
            self._lifeline = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=TIMEOUT)
            for pipe in (self._proc.stdout, self._proc.stderr):
                if pipe is not None:
                    pipe.close()
            self._proc = None
        deadline = time.monotonic() + TIMEOUT
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._log_sock is not None:
            with contextlib.suppress(OSError):
                self._log_sock.shutdown(socket.SHUT_RDWR)
            self._log_sock.close()
            self._log_sock = None
        if self._log_thread is not None:
            self._log_thread.join(5)
            self._log_thread = None
        self.init_pid = 0
        self._ns = ""


def _etc_with_users(names: Sequence[str]) -> dict[str, str]:
    """passwd and group files: the machine's, plus system users `names` (for a namespace's /etc)."""
    ids = free_ids(len(names))
    passwd = pathlib.Path("/etc/passwd").read_text()
    group = pathlib.Path("/etc/group").read_text()
    for name, number in zip(names, ids, strict=True):
        passwd += f"{name}:x:{number}:{number}::/nonexistent:/usr/sbin/nologin\n"
        group += f"{name}:x:{number}:\n"
    return {"passwd": passwd, "group": group}


def _user_ids(etc: Mapping[str, str], name: str) -> tuple[int, int]:
    for line in etc["passwd"].splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise MTAError(f"no user {name}")


# -- the drivers ------------------------------------------------------------------------------------

class ClientMTA(abc.ABC):
    """One MTA with a private configuration, relaying everything to `upstream` (host, port)."""

    name: ClassVar[str]
    package: ClassVar[str]  # the Debian package
    # files that must exist (absolute, or relative to PACKAGES/<package>)
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, folder: pathlib.Path, upstream: tuple[str, int]) -> None:
        self.folder = folder
        self.upstream = upstream

    @classmethod
    def tree(cls) -> pathlib.Path:
        return PACKAGES / cls.package

    @classmethod
    def missing(cls) -> str | None:
        """None when this MTA can run here, else what is missing."""
        if os.geteuid() != 0:
            return f"{cls.name} runs with a private configuration only as root"
        for tool in ("unshare", "nsenter"):
            if shutil.which(tool) is None:
                return f"{tool} (util-linux) is not installed"
        for need in cls.needs:
            path = pathlib.Path(need) if need.startswith("/") else cls.tree() / need
            if not path.exists():
                return f"{cls.name}: {path} is missing (run `make tools`: scripts/install-system-deps.sh)"
        return None

    def start(self) -> ClientMTA:
        problem = self.missing()
        if problem is not None:
            raise MTAError(problem)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start()
        return self

    def stop(self) -> None:
        self._stop()

    def __enter__(self) -> ClientMTA:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @abc.abstractmethod
    def _start(self) -> None: ...

    @abc.abstractmethod
    def _stop(self) -> None: ...

    @abc.abstractmethod
    def submit(self, msg: Message) -> None:
        """Hand `msg` to the MTA as an application does; it then tries to deliver it as it normally would."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Force a delivery attempt of everything queued, now."""

    @abc.abstractmethod
    def queued(self) -> int:
        """Messages (dma: recipient entries) in the MTA's queue."""

    @abc.abstractmethod
    def deferred(self) -> int:
        """Queued messages the MTA has tried and now holds for a later retry (its own account)."""

    @abc.abstractmethod
    def log_text(self) -> str: ...

    def state_text(self) -> str:
        """What a failing test shows besides the log: the MTA's processes and queue files."""
        return ""


class Postfix(ClientMTA):
    """A private Postfix instance: `postfix -c <folder>/etc`, an smtpd on a free loopback port for
    submission, relayhost = [host]:port. Also the benchmark's Postfix (bench/postfix.py), with
    `process_limit` as its session cap."""

    name = "postfix"
    package = "postfix"
    needs = ("/usr/sbin/postfix", "/usr/sbin/postqueue", "/usr/lib/postfix/sbin/master")
    POSTFIX = "/usr/sbin/postfix"
    POSTQUEUE = "/usr/sbin/postqueue"
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
    # postqueue -f (and sendmail) need pickup: without it Postfix counts as down for them
    PICKUP = "pickup fifo n - n 60 1 pickup\n"

    def __init__(self, folder: pathlib.Path, upstream: tuple[str, int], *, process_limit: int = 100,
                 label: str = "postfix-mailrelay", port: int = 0, pickup: bool = True) -> None:
        super().__init__(folder, upstream)
        self.etc = folder / "etc"
        self.process_limit = process_limit
        self.label = label
        self.port = port or netutil.free_port()
        self.pickup = pickup
        self.master_pid: int | None = None

    @classmethod
    def missing(cls) -> str | None:
        if os.geteuid() != 0:
            return "postfix runs with a private configuration only as root"
        for need in cls.needs:
            if not pathlib.Path(need).exists():
                return f"postfix: {need} is missing (run `make tools`: scripts/install-system-deps.sh)"
        return None

    def main_cf(self) -> str:
        """Postfix defaults except what makes it a loopback relay (relayhost, mynetworks, no local
        delivery, no chroot) and `default_process_limit`."""
        root = self.folder
        host, port = self.upstream
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
syslog_name = {self.label}
myhostname = {self.label}.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relayhost = [{host}]:{port}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_process_limit = {self.process_limit}
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
biff = no
append_dot_mydomain = no
smtputf8_enable = no
"""

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.POSTFIX, "-c", str(self.etc), *args], capture_output=True, text=True,
                              check=check, timeout=TIMEOUT)

    def running(self) -> bool:
        return self.etc.is_dir() and self._postfix("status", check=False).returncode == 0

    def start(self) -> Postfix:
        if self.running():  # idempotent: a second start() is a no-op
            return self
        super().start()
        return self

    def _start(self) -> None:
        for sub in ("etc", "queue", "data"):
            (self.folder / sub).mkdir(mode=0o755, exist_ok=True)
        self.folder.chmod(0o755)
        shutil.chown(self.folder / "data", user="postfix")
        (self.etc / "main.cf").write_text(self.main_cf())
        master_cf = self.MASTER_CF.format(listen=f"127.0.0.1:{self.port}")
        (self.etc / "master.cf").write_text(master_cf + (self.PICKUP if self.pickup else ""))
        result = self._postfix("start", check=False)
        if result.returncode != 0:
            raise MTAError(f"postfix start failed: {result.stderr.strip()} {self.log_tail()}")
        pid_file = self.folder / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + TIMEOUT
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.master_pid = int(pid_file.read_text().split()[0])
        netutil.wait_for_greeting("127.0.0.1", self.port, timeout=TIMEOUT)

    def _stop(self) -> None:
        if self.master_pid is None:
            return
        leftovers = processes_in(self.folder / "queue")  # every Postfix daemon works in queue_directory
        master = _state(self.master_pid)
        self._postfix("stop", check=False)
        deadline = time.monotonic() + TIMEOUT
        while master is not None and _state(self.master_pid) == master and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_all(leftovers + processes_in(self.folder / "queue"))
        self.master_pid = None

    def submit(self, msg: Message) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as client:
            client.sendmail(msg.sender, list(msg.recipients), msg.content)

    def flush(self) -> None:
        subprocess.run([self.POSTQUEUE, "-c", str(self.etc), "-f"], capture_output=True, check=True,
                       timeout=TIMEOUT)

    def _entries(self) -> list[dict[str, object]]:
        result = subprocess.run([self.POSTQUEUE, "-c", str(self.etc), "-j"], capture_output=True,
                                text=True, check=True, timeout=TIMEOUT)
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def queued(self) -> int:
        return len(self._entries())

    def deferred(self) -> int:
        return sum(1 for entry in self._entries() if entry.get("queue_name") == "deferred")

    def log_text(self) -> str:
        try:
            return (self.folder / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def pids(self) -> list[int]:
        return [pid for pid, _ in processes_in(self.folder / "queue")]

    def sent_count(self) -> int:
        """Deliveries Postfix made to the smarthost (status=sent lines in its maillog)."""
        return sum(1 for line in self.log_text().splitlines() if " status=sent " in line)


class Exim(ClientMTA):
    """Exim 4 (Debian's exim4-daemon-light) with `-C <folder>/exim.conf`: a manualroute smarthost
    (`route_list = * host::port`, `self = send`, `allow_localhost`), its own spool and logs; no daemon."""

    name = "exim"
    package = "exim4-daemon-light"
    needs = ("usr/sbin/exim4",)

    def __init__(self, folder: pathlib.Path, upstream: tuple[str, int]) -> None:
        super().__init__(folder, upstream)
        self.binary = self.tree() / "usr" / "sbin" / "exim4"
        self.conf = folder / "exim.conf"
        self.ns = Namespace(folder / "ns", {})

    def config(self) -> str:
        host, port = self.upstream
        return f"""\
exim_path = {self.binary}
spool_directory = {self.folder}/spool
log_file_path = {self.folder}/log/%slog
primary_hostname = exim.client.test
qualify_domain = client.test
keep_environment =

begin routers
smarthost:
  driver = manualroute
  domains = *
  route_list = * {host}::{port}
  self = send
  transport = remote_smtp
  no_more

begin transports
remote_smtp:
  driver = smtp
  allow_localhost
  hosts_try_chunking =

begin retry
# Debian's default rule
*   *   F,2h,15m; G,16h,1h,1.5; F,4d,6h
"""

    def _start(self) -> None:
        etc = _etc_with_users(["Debian-exim"])
        uid, gid = _user_ids(etc, "Debian-exim")
        self.conf.write_text(self.config())
        for sub in ("spool", "log"):
            (self.folder / sub).mkdir(exist_ok=True)
            os.chown(self.folder / sub, uid, gid)
        self.ns.layers = {"/etc": {**etc, "exim4/trusted_configs": f"{self.conf}\n"}}
        self.ns.start()

    def _stop(self) -> None:
        self.ns.stop()

    def exim(self, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
        result = self.ns.run([str(self.binary), "-C", str(self.conf), *args], stdin=stdin, check=check)
        return result.stdout.decode(errors="replace")

    def submit(self, msg: Message) -> None:
        # -odi: delivered at once, in the foreground; this returns after the first attempt
        self.exim("-odi", "-oi", "-f", msg.sender, "--", *msg.recipients, stdin=msg.lf_content())

    def flush(self) -> None:
        self.exim("-qf")  # a queue run that tries every message, retry times or not; waits for it

    def queued(self) -> int:
        return int(self.exim("-bpc").strip() or 0)

    def deferred(self) -> int:
        # no daemon: with no exim process running, whatever is queued waits for the next queue run
        return 0 if self.ns.pids() else self.queued()

    def log_text(self) -> str:
        try:
            return (self.folder / "log" / "mainlog").read_text(errors="replace")
        except OSError:
            return ""


class OpenSMTPD(ClientMTA):
    """OpenSMTPD (`smtpd -d -f <folder>/smtpd.conf`) listening on a free loopback port for submission,
    `action relay host smtp://host:port`; its users and queue (/var/spool/smtpd) exist only in its
    namespace."""

    name = "opensmtpd"
    package = "opensmtpd"
    needs = ("usr/sbin/smtpd", "usr/sbin/smtpctl")

    def __init__(self, folder: pathlib.Path, upstream: tuple[str, int]) -> None:
        super().__init__(folder, upstream)
        self.port = netutil.free_port()
        self.conf = folder / "smtpd.conf"
        self.ns = Namespace(folder / "ns", {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.queue_gid = 0

    def config(self) -> str:
        host, port = self.upstream
        # session-keepalive: an idle connection is kept 10 s by default for more mail; 2 s here, so that
        # a test waits less for it to close. bounce warn-interval: a test forces a queue run every 2 s
        # (flush), each forced run that finds the route still disabled counts as a failed try, and
        # OpenSMTPD's next try grows with the square of the tries: after some twenty forced runs it lies
        # more than 4 hours (the default warn-interval) after the message was queued, and OpenSMTPD mails
        # the sender a "delayed for more than 4 hours" warning 30 s after the message arrived. That is
        # the forcing's doing, not the relay's; a year keeps it out (the rest is OpenSMTPD's defaults).
        return ("mta limit session-keepalive 2\n"
                "bounce warn-interval 365d\n"
                f"listen on 127.0.0.1 port {self.port}\n"
                f'action "relay" relay host smtp://{host}:{port}\n'
                'match from local for any action "relay"\n')

    def _start(self) -> None:
        self.conf.write_text(self.config())
        etc = _etc_with_users(["opensmtpd", "opensmtpq"])
        self.queue_gid = _user_ids(etc, "opensmtpq")[1]
        self.ns.layers = {
            "/etc": {**etc, "mailname": "opensmtpd.client.test\n"},
            "/var/spool": {},
            "/var/lib": {},
            "/run": {},
        }
        self.ns.start()
        # the chroot of its unprivileged processes, as the package's postinst makes it
        self.ns.run(["mkdir", "-p", "/var/lib/opensmtpd/empty"])
        self.proc = self.ns.popen([str(self.tree() / "usr/sbin/smtpd"), "-d", "-f", str(self.conf)],
                                  self.folder / "smtpd.log")
        netutil.wait_for_greeting("127.0.0.1", self.port, timeout=TIMEOUT, proc=self.proc)

    def _stop(self) -> None:
        self.ns.stop()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=TIMEOUT)
            self.proc = None

    def smtpctl(self, *args: str) -> str:
        # smtpctl must run with the opensmtpq group (the package installs it setgid)
        smtpctl = str(self.tree() / "usr/sbin/smtpctl")
        argv = ["setpriv", f"--regid={self.queue_gid}", "--keep-groups", smtpctl, *args]
        return self.ns.run(argv).stdout.decode(errors="replace")

    def submit(self, msg: Message) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as client:
            client.sendmail(msg.sender, list(msg.recipients), msg.content)

    def flush(self) -> None:
        # every envelope is tried now; a route disabled after a refused first connection (15 s,
        # OpenSMTPD's own backoff) still fails them at once ("No valid route") until it is enabled again.
        # `smtpctl resume route` would shorten that, but a route resumed by hand is not disabled again
        # and OpenSMTPD then keeps reconnecting: not what it does on its own.
        self.smtpctl("schedule", "all")

    def envelopes(self) -> list[list[str]]:
        """`smtpctl show queue`, one row per envelope (a recipient of a message): id, source, agent
        (mta, bounce), flags, sender, recipient, destination, created, expires, last try, retries,
        run state (pending, inflight), seconds (to the next try / since the last), last error."""
        return [line.split("|") for line in self.smtpctl("show", "queue").splitlines() if "|" in line]

    def queued(self) -> int:
        return len({row[0][:8] for row in self.envelopes()})  # an envelope id starts with its message id

    def deferred(self) -> int:
        return len({row[0][:8] for row in self.envelopes()
                    if len(row) > 11 and row[11] == "pending" and row[10].isdigit() and int(row[10]) > 0})

    def log_text(self) -> str:
        try:
            return (self.folder / "smtpd.log").read_text(errors="replace")
        except OSError:
            return ""


class Nullmailer(ClientMTA):
    """nullmailer-send with NULLMAILER_TEST_PREFIX=<folder>: conf/remotes holds `host smtp --port=P`;
    submission through its sendmail, a forced retry by writing to its trigger (a FIFO)."""

    name = "nullmailer"
    package = "nullmailer"
    needs = ("usr/sbin/nullmailer-send", "usr/sbin/nullmailer-queue", "usr/sbin/sendmail",
             "usr/lib/nullmailer/smtp", "usr/bin/nullmailer-dsn", "usr/bin/nullmailer-inject")

    def __init__(self, folder: pathlib.Path, upstream: tuple[str, int]) -> None:
        super().__init__(folder, upstream)
        self.env = {**os.environ, "NULLMAILER_TEST_PREFIX": str(folder)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "send.log"

    def _start(self) -> None:
        host, port = self.upstream
        tree, root = self.tree(), self.folder
        for sub in ("conf", "queue/queue", "queue/tmp", "queue/failed", "protocols", "sbin", "bin"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "conf" / "remotes").write_text(f"{host} smtp --port={port}\n")
        (root / "conf" / "defaultdomain").write_text("client.test\n")
        (root / "conf" / "defaulthost").write_text("nullmailer.client.test\n")
        (root / "mailname").write_text("nullmailer.client.test\n")
        trigger = root / "queue" / "trigger"
        if not trigger.exists():
            os.mkfifo(trigger, 0o622)
        links = {"protocols/smtp": "usr/lib/nullmailer/smtp",
                 "sbin/nullmailer-queue": "usr/sbin/nullmailer-queue",
                 "bin/nullmailer-dsn": "usr/bin/nullmailer-dsn",
                 "bin/nullmailer-inject": "usr/bin/nullmailer-inject"}
        for link, target in links.items():
            (root / link).unlink(missing_ok=True)
            (root / link).symlink_to(tree / target)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([str(tree / "usr/sbin/nullmailer-send")], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def _stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # nullmailer-send and a protocol process, if any
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=TIMEOUT)
        kill_all(processes_in(self.folder))
        self.proc = None

    def submit(self, msg: Message) -> None:
        result = subprocess.run([str(self.tree() / "usr/sbin/sendmail"), "-f", msg.sender, *msg.recipients],
                                input=msg.lf_content(), env=self.env, capture_output=True, timeout=TIMEOUT)
        if result.returncode != 0:
            raise MTAError(f"nullmailer's sendmail exited with {result.returncode}: {result.stderr!r}")

    def flush(self) -> None:
        try:
            fd = os.open(self.folder / "queue" / "trigger", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nullmailer-send is not reading it
            return
        try:
            os.write(fd, b"\n")
        finally:
            os.close(fd)

    def queued(self) -> int:
        return sum(1 for _ in (self.folder / "queue" / "queue").iterdir())

    def deferred(self) -> int:
        # nullmailer-send ends each run with "Delivery complete, N message(s) remain." and then waits
        lines = self.log_text().splitlines()
        if not lines or not lines[-1].startswith("Delivery complete, "):
            return 0
        return int(lines[-1].split()[2])

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class Dma(ClientMTA):
    """dma, the DragonFly Mail Agent, with /etc/dma/dma.conf from its namespace (no option names another
    file): SMARTHOST and PORT, its spool in the folder; its syslog lines kept. A forced retry is `dma -q`,
    which marks the queue flushed; delivery processes sleeping in their backoff check that mark when they
    wake, so they are woken with SIGHUP."""

    name = "dma"
    package = "dma"
    needs = ("usr/sbin/dma",)

    def __init__(self, folder: pathlib.Path, upstream: tuple[str, int]) -> None:
        super().__init__(folder, upstream)
        self.binary = self.tree() / "usr" / "sbin" / "dma"
        self.spool = folder / "spool"
        self.ns = Namespace(folder / "ns", {}, syslog=True)

    def _start(self) -> None:
        host, port = self.upstream
        self.spool.mkdir(exist_ok=True)
        shutil.chown(self.spool, user="mail", group="mail")  # dma drops root for user mail
        self.spool.chmod(0o2770)
        (self.folder / "aliases").write_text("")
        conf = (f"SMARTHOST {host}\nPORT {port}\nSPOOLDIR {self.spool}\nALIASES {self.folder}/aliases\n"
                "MAILNAME dma.client.test\n")
        self.ns.layers = {"/etc": {"dma/dma.conf": conf, "dma/auth.conf": ""}}
        self.ns.start()

    def _stop(self) -> None:
        self.ns.stop()

    def submit(self, msg: Message) -> None:
        # dma queues, then delivers from a background process of its own
        self.ns.run([str(self.binary), "-f", msg.sender, "--", *msg.recipients], stdin=msg.lf_content())

    def _delivery_processes(self) -> list[int]:
        return [pid for pid in self.ns.pids() if _comm(pid) == "dma"]

    def flush(self) -> None:
        self.ns.run([str(self.binary), "-q"])
        for pid in self._delivery_processes():
            if _sleeping(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

    def queued(self) -> int:
        return sum(1 for path in self.spool.iterdir() if path.name.startswith("Q"))

    def deferred(self) -> int:
        return sum(1 for pid in self._delivery_processes() if _sleeping(pid))

    def log_text(self) -> str:
        return "\n".join(self.ns.syslog_lines)

    def state_text(self) -> str:
        lines = [f"spool: {sorted(p.name for p in self.spool.iterdir())}"]
        for pid in self.ns.pids():
            try:
                syscall = pathlib.Path(f"/proc/{pid}/syscall").read_text().split()[0]
                cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError):
                continue
            lines.append(f"pid {pid} {_comm(pid)} {_state(pid)} syscall {syscall}: {cmdline}")
        return "\n".join(lines)


CLIENTS: tuple[type[ClientMTA], ...] = (Postfix, Exim, OpenSMTPD, Nullmailer, Dma)


# -- msmtp: no queue --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MsmtpResult:
    exit_code: int
    output: str


class Msmtp:
    """msmtp (Debian's package), which sends at once and keeps nothing: its exit code is all the
    application gets. `--configfile` points at a private file; /etc/msmtprc is never read."""

    name = "msmtp"

    def __init__(self, folder: pathlib.Path, upstream: tuple[str, int]) -> None:
        self.folder = folder
        self.upstream = upstream
        self.conf = folder / "msmtprc"

    @staticmethod
    def missing() -> str | None:
        if shutil.which("msmtp") is None:
            return "msmtp is not installed (run `make tools`: scripts/install-system-deps.sh)"
        return None

    def send(self, msg: Message) -> MsmtpResult:
        host, port = self.upstream
        self.folder.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"account default\nhost {host}\nport {port}\nauth off\ntls off\n"
                             f"domain msmtp.client.test\nfrom {msg.sender}\n")
        self.conf.chmod(0o600)
        result = subprocess.run(["msmtp", f"--file={self.conf}", "-f", msg.sender, "--", *msg.recipients],
                                input=msg.lf_content(), capture_output=True, timeout=TIMEOUT)
        return MsmtpResult(result.returncode, (result.stdout + result.stderr).decode(errors="replace"))
