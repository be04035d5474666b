"""The durable spool: one file per message, written so that a 250 is only ever sent for mail on disk.

What it is for: `Spool.store()` hands the record to a group commit: one thread hop for all the messages
that arrived together, in which each is written to `tmp/<id>.tmp`, fdatasynced and renamed into
`queue/<id>.msg` (the files of a batch in parallel, on COMMIT_THREADS threads), and then the queue
directory is fsynced once; only then does `store()` return. The event loop never touches the file.
`recover()` finds every complete message after a restart; `dead_letter()` moves a message to
`deadletter/` with its reason in `<id>.reason` alongside. A record is:

    MAILRELAY-SPOOL 1\\n
    {"id": ..., "mail_from": ..., "rcpt_tos": [...], "mail_options": [...], "size": N,
     "received_at": T, "crc32": C}\\n
    <N bytes of content, exactly as received after dot-unstuffing>

`recover()` checks size and CRC, so a torn file can never be delivered as if it were whole: such a file
goes to dead-letter with the reason "corrupt ..." (it was never answered 250, since the 250 waits for
the fsyncs).

Fault injection (tests only, honest and explicit): when the environment variable
MAILRELAY_SPOOL_FAULT_FILE names a file and that file exists, its whitespace-separated words inject
faults: `write-enospc` (writing a new message fails with ENOSPC), `write-eio`, `fsync-eio`, and
`free=N` (free_bytes() reports N). Without the variable nothing is checked.

Size limit (`--spool-max-bytes`, `max_bytes`; 0 = none): the bytes the spool holds (queue, tmp and
dead-letter files, each rounded up to whole 4 KiB blocks, as the kubelet counts an emptyDir) are
tracked in a `Usage` counter: set once by `recover()` (one walk of the directory at start), then moved
by every store, removal and dead-letter, never by walking the directory again. `store()` charges the
record before writing it and refuses with SpoolFullError when the charge would pass the limit (the
same 452 4.3.1 as a full disk), and `free_bytes()` is min(disk free, limit - bytes held), so the MAIL
SIZE check sees the limit too. With `--workers N` the counter lives in shared memory created by the
supervisor before it forks, so the limit holds pod-wide. Files changed by hand while the relay runs are
not seen until the next start.

What it must not do: decide SMTP replies (smtp.py maps SpoolFullError to 452 and SpoolError to 451),
deliver anything, or log message content.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import itertools
import json
import multiprocessing
import os
import pathlib
import threading
import time
import zlib
from typing import Any

from mailrelay_relay import metrics

MAGIC = b"MAILRELAY-SPOOL 1\n"
SUFFIX = ".msg"
REASON_SUFFIX = ".reason"
FAULT_ENV = "MAILRELAY_SPOOL_FAULT_FILE"
FREE_MAX_AGE = 0.1  # seconds a free-space reading is reused (MAILs reserve what they declare meanwhile)
CACHE_BYTES = 64 * 1024 * 1024  # contents kept in memory for delivery, per process
COMMIT_THREADS = 4  # files of one group commit written and fdatasynced in parallel
BLOCK = 4096  # allocation unit assumed for the size limit


def disk_bytes(size: int) -> int:
    """What a file of `size` bytes takes against the size limit: whole blocks, at least one."""
    return max(1, -(-size // BLOCK)) * BLOCK


class Usage:
    """Bytes held by one spool directory, shared by every process forked after it was made."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._value = ctx.RawValue(ctypes.c_int64, 0)
        self._lock = ctx.Lock()  # also serialises threads of one process (store vs. batched removals)

    @property
    def value(self) -> int:
        return int(self._value.value)

    def set(self, value: int) -> None:
        with self._lock:
            self._value.value = value

    def add(self, delta: int) -> None:
        with self._lock:
            self._value.value += delta

    def reserve(self, amount: int, limit: int) -> bool:
        """Add `amount` unless that would pass `limit` (0 = no limit); True when added."""
        with self._lock:
            if limit and self._value.value + amount > limit:
                return False
            self._value.value += amount
            return True


class SpoolError(Exception):
    """Writing to the spool failed (not for lack of space)."""


class SpoolFullError(SpoolError):
    """The spool's file system is full (ENOSPC or EDQUOT)."""


class CorruptRecord(ValueError):
    """A spool file is not a complete, valid record."""


@dataclasses.dataclass(frozen=True)
class Envelope:
    mail_from: str  # "" for the null sender <>
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...] = ()  # ESMTP MAIL params to pass upstream, e.g. ("BODY=8BITMIME",)
    # ESMTP RCPT params, one tuple per recipient in rcpt_tos order (DSN's NOTIFY and ORCPT); () for none
    rcpt_options: tuple[tuple[str, ...], ...] = ()

    def options_of(self, index: int) -> tuple[str, ...]:
        """The RCPT parameters of recipient `index` (none when the envelope carries none)."""
        return self.rcpt_options[index] if index < len(self.rcpt_options) else ()


@dataclasses.dataclass(frozen=True)
class QueuedMessage:
    id: str  # as in "250 2.0.0 Ok: queued as <id>"
    envelope: Envelope
    size: int  # bytes of content
    received_at: float  # unix time of the 250
    path: pathlib.Path  # the spool file


def encode_record(msg_id: str, envelope: Envelope, content: bytes, received_at: float) -> bytes:
    """The bytes of one spool file."""
    return encode_header(msg_id, envelope, content, received_at) + content


def encode_header(msg_id: str, envelope: Envelope, content: bytes, received_at: float,
                  crc: int | None = None) -> bytes:
    """The bytes of one spool file before its content: the magic, the header line (with the content's
    size and CRC-32, computed here unless given) and its line feed."""
    header = {
        "id": msg_id,
        "mail_from": envelope.mail_from,
        "rcpt_tos": list(envelope.rcpt_tos),
        "mail_options": list(envelope.mail_options),
        **({"rcpt_options": [list(o) for o in envelope.rcpt_options]} if any(envelope.rcpt_options) else {}),
        "size": len(content),
        "received_at": received_at,
        "crc32": zlib.crc32(content) if crc is None else crc,
    }
    line = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return b"".join((MAGIC, line, b"\n"))


def decode_record(data: bytes) -> tuple[str, Envelope, bytes, float]:
    """Inverse of encode_record: (id, envelope, content, received_at); CorruptRecord if anything is off."""
    if not data.startswith(MAGIC):
        raise CorruptRecord("bad magic")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise CorruptRecord("truncated header")
    try:
        header: Any = json.loads(data[len(MAGIC):end])
        msg_id = header["id"]
        mail_from = header["mail_from"]
        rcpt_tos = tuple(header["rcpt_tos"])
        options = tuple(header["mail_options"])
        rcpt_options = tuple(tuple(o) for o in header.get("rcpt_options", ()))
        size = header["size"]
        received_at = float(header["received_at"])
        crc = header["crc32"]
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptRecord(f"bad header: {error.__class__.__name__}") from None
    if not (isinstance(msg_id, str) and isinstance(mail_from, str) and isinstance(size, int)
            and isinstance(crc, int) and all(isinstance(r, str) for r in rcpt_tos)
            and all(isinstance(o, str) for o in options)
            and len(rcpt_options) in (0, len(rcpt_tos))
            and all(isinstance(o, str) for group in rcpt_options for o in group)):
        raise CorruptRecord("bad header types")
    content = data[end + 1:]
    if len(content) != size:
        raise CorruptRecord(f"size {len(content)} != {size}")
    if zlib.crc32(content) != crc:
        raise CorruptRecord("crc mismatch")
    return msg_id, Envelope(mail_from, rcpt_tos, options, rcpt_options), content, received_at


@dataclasses.dataclass
class _Pending:
    msg_id: str
    envelope: Envelope
    content: bytes
    received_at: float
    tmp: pathlib.Path
    final: pathlib.Path
    faults: tuple[str, ...]
    future: asyncio.Future[None]
    charge: int = 0  # bytes reserved in Usage for this file; given back if it is not written
    written: int = 0  # what the file takes against the limit (disk_bytes), once the commit thread wrote it
    error: BaseException | None = None


class Spool:
    """A spool directory with queue/, tmp/ and deadletter/ (created if missing).

    `max_bytes` is the size limit (0: only the disk limits it); `usage` is the shared counter of another
    Spool on the same directory (a worker's, made by the supervisor before the fork), else a new one.
    """

    def __init__(self, root: pathlib.Path, *, max_bytes: int = 0, usage: Usage | None = None) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.root = pathlib.Path(root)
        self.max_bytes = max_bytes
        self.usage = usage if usage is not None else Usage()
        self.queue_dir = self.root / "queue"
        self.tmp_dir = self.root / "tmp"
        self.deadletter_dir = self.root / "deadletter"
        for directory in (self.root, self.queue_dir, self.tmp_dir, self.deadletter_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._pending: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool-commit")
        self._io = concurrent.futures.ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="spool-io")
        self._counter = itertools.count()
        self._pid = os.getpid()
        # Contents of messages stored by this process and not yet removed, so that delivery does not
        # read back from disk what it was just handed (bounded; a miss reads the file).
        self._cache: dict[str, bytes] = {}
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()  # remove() may run in a thread (delivery batches removals)
        self._free = 0
        self._free_at = -1e9
        self._fault_file = os.environ.get(FAULT_ENV) or None
        # Filled by each commit, read by whoever publishes the fsync histogram (smtp.py / app.py).
        self.last_commit_seconds = 0.0
        self.commits = 0

    # -- ids and faults -------------------------------------------------------------------------------
    def new_id(self, received_at: float) -> str:
        serial = next(self._counter) & 0xFFFFF
        return f"{int(received_at * 1_000_000):014X}{self._pid & 0xFFFFFF:06X}{serial:05X}"

    def _faults(self) -> list[str]:
        if self._fault_file is None:
            return []
        try:
            with open(self._fault_file, encoding="utf-8") as handle:
                return handle.read().split()
        except OSError:
            return []

    # -- store (group commit) -------------------------------------------------------------------------
    async def store(self, envelope: Envelope, content: bytes, received_at: float) -> QueuedMessage:
        """Write, fsync, rename, fsync the directory; return only then. SpoolFullError / SpoolError.

        All file work happens in the commit thread (creating a file can block on the file system's
        journal), and so does the content's CRC-32 (zlib lets go of the GIL for it): the event loop only
        reserves the room and waits for its batch. The reservation counts the widest CRC; the commit
        settles it to the file's real size.
        """
        msg_id = self.new_id(received_at)
        widest = encode_header(msg_id, envelope, content, received_at, crc=0xFFFFFFFF)
        charge = disk_bytes(len(widest) + len(content))
        if not self.usage.reserve(charge, self.max_bytes):
            raise SpoolFullError(f"spool size limit: {charge} more bytes would pass the limit of "
                                 f"{self.max_bytes} (holding {self.usage.value})")
        loop = asyncio.get_running_loop()
        pending = _Pending(msg_id, envelope, content, received_at, self.tmp_dir / (msg_id + ".tmp"),
                           self.queue_dir / (msg_id + SUFFIX), tuple(self._faults()), loop.create_future(),
                           charge)
        self._pending.append(pending)
        if self._committer is None:
            self._committer = loop.create_task(self._commit_loop())
        await pending.future
        with self._cache_lock:
            if self._cache_bytes + len(content) <= CACHE_BYTES:
                self._cache[msg_id] = content
                self._cache_bytes += len(content)
        return QueuedMessage(msg_id, envelope, len(content), received_at, pending.final)

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                started = time.perf_counter()
                try:
                    await loop.run_in_executor(self._executor, self._commit_batch, batch)
                except BaseException as error:  # the thread itself failed: fail the whole batch
                    for item in batch:
                        if item.error is None:
                            item.error = error
                self.last_commit_seconds = time.perf_counter() - started
                self.commits += 1
                metrics.SPOOL_FSYNC_DURATION.observe(self.last_commit_seconds)
                for item in batch:
                    if item.error is not None:
                        self.usage.add(-item.charge)  # nothing of it stays on disk
                    elif item.written != item.charge:
                        self.usage.add(item.written - item.charge)  # the CRC was narrower
                    if item.future.done():
                        continue
                    if item.error is None:
                        item.future.set_result(None)
                    else:
                        item.future.set_exception(_spool_error(item.error))
        finally:
            self._committer = None

    @staticmethod
    def _write_one(item: _Pending) -> None:
        """tmp file: create, write, fdatasync, close; then rename into the queue (not yet durable)."""
        fd = os.open(item.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if "write-enospc" in item.faults:
                raise OSError(errno.ENOSPC, "injected fault: no space left on device")
            if "write-eio" in item.faults:
                raise OSError(errno.EIO, "injected fault: input/output error")
            head = encode_header(item.msg_id, item.envelope, item.content, item.received_at)
            item.written = disk_bytes(len(head) + len(item.content))
            _write_all(fd, head, item.content)
            if "fsync-eio" in item.faults:
                raise OSError(errno.EIO, "injected fault: fsync failed")
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(item.tmp)
            raise
        os.close(fd)
        try:
            os.rename(item.tmp, item.final)
        except BaseException:
            _unlink_quietly(item.tmp)
            raise

    @classmethod
    def _try_write(cls, item: _Pending) -> None:
        try:
            cls._write_one(item)
        except OSError as error:
            item.error = error

    def _commit_batch(self, batch: list[_Pending]) -> None:
        # The files of one batch are written and fdatasynced in parallel (the device and the journal
        # handle concurrent syncs much better than a serial chain); one directory fsync covers them all.
        if len(batch) == 1:
            self._try_write(batch[0])
        else:
            list(self._io.map(self._try_write, batch))
        renamed = [item for item in batch if item.error is None]
        if renamed:
            try:
                _fsync_dir(self.queue_dir)
            except OSError as error:
                # Durability unknown: take the files back, so a 4xx never goes with a later delivery.
                for item in renamed:
                    item.error = error
                    _unlink_quietly(item.final)

    # -- reading, recovery, removal -------------------------------------------------------------------
    def load(self, path: pathlib.Path) -> QueuedMessage:
        """Parse one queue file (CorruptRecord if it is not a complete record)."""
        data = pathlib.Path(path).read_bytes()
        msg_id, envelope, content, received_at = decode_record(data)
        return QueuedMessage(msg_id, envelope, len(content), received_at, pathlib.Path(path))

    def recover(self) -> list[QueuedMessage]:
        """At start: remove tmp leftovers; return every complete message, oldest first.

        A file that is not a complete record goes to dead-letter (reason "corrupt: ...").
        Call it only while no other process writes to this spool.
        """
        for leftover in self.tmp_dir.iterdir():
            _unlink_quietly(leftover)
        messages: list[QueuedMessage] = []
        for path in sorted(self.queue_dir.glob("*" + SUFFIX)):
            try:
                messages.append(self.load(path))
            except (CorruptRecord, OSError) as error:
                self._move_to_deadletter(path, path.name[: -len(SUFFIX)], f"corrupt: {error}")
        messages.sort(key=lambda m: (m.received_at, m.id))
        self.usage.set(self.measure())
        return messages

    def measure(self) -> int:
        """Bytes the spool's files hold against the size limit (walks the directories: at start only)."""
        total = 0
        for directory in (self.queue_dir, self.tmp_dir, self.deadletter_dir):
            for entry in os.scandir(directory):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        total += disk_bytes(entry.stat(follow_symlinks=False).st_size)
        return total

    @property
    def held_bytes(self) -> int:
        """Bytes held by the spool's files, as tracked since recover()."""
        return self.usage.value

    def read_content(self, msg: QueuedMessage) -> bytes:
        cached = self._cache.get(msg.id)
        if cached is not None:
            return cached
        _, _, content, _ = decode_record(msg.path.read_bytes())
        return content

    def remove(self, msg: QueuedMessage) -> None:
        """After the upstream's 250. A message removed twice is not an error."""
        self._forget(msg.id)
        try:
            size = os.stat(msg.path).st_size
            os.unlink(msg.path)
        except FileNotFoundError:
            return
        self.usage.add(-disk_bytes(size))

    def dead_letter(self, msg: QueuedMessage, reason: str) -> None:
        """Move the message to deadletter/ and write its reason next to it (durably)."""
        self._forget(msg.id)
        self._move_to_deadletter(msg.path, msg.id, reason)

    def _forget(self, msg_id: str) -> None:
        with self._cache_lock:
            content = self._cache.pop(msg_id, None)
            if content is not None:
                self._cache_bytes -= len(content)

    def _move_to_deadletter(self, path: pathlib.Path, msg_id: str, reason: str) -> None:
        target = self.deadletter_dir / (msg_id + SUFFIX)
        reason_path = self.deadletter_dir / (msg_id + REASON_SUFFIX)
        reason_text = reason.replace("\r", " ").replace("\n", " ")
        reason_bytes = (reason_text + "\n").encode("utf-8", "backslashreplace")
        fd = os.open(reason_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, reason_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        # The message file moves (same size); the reason file is new. Dead letters stay until removed by
        # hand, so they keep counting against the size limit.
        self.usage.add(disk_bytes(len(reason_bytes)))
        os.rename(path, target)
        _fsync_dir(self.deadletter_dir)
        _fsync_dir(self.queue_dir)

    def dead_letter_count(self) -> int:
        return sum(1 for entry in os.scandir(self.deadletter_dir) if entry.name.endswith(SUFFIX))

    def queue_count(self) -> int:
        return sum(1 for entry in os.scandir(self.queue_dir) if entry.name.endswith(SUFFIX))

    def free_bytes(self) -> int:
        """Free bytes for new messages: the spool file system's free space (statvfs, at most
        FREE_MAX_AGE seconds old), and with a size limit at most what the limit leaves."""
        for word in self._faults():
            if word.startswith("free="):
                return int(word[5:])
        now = time.monotonic()
        if now - self._free_at > FREE_MAX_AGE:
            stat = os.statvfs(self.root)
            self._free = stat.f_bavail * stat.f_frsize
            self._free_at = now
        if self.max_bytes:
            return max(0, min(self._free, self.max_bytes - self.usage.value))
        return self._free

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._io.shutdown(wait=True)


def _spool_error(error: BaseException) -> SpoolError:
    if isinstance(error, SpoolError):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(str(error))
    return SpoolError(str(error))


def _write_all(fd: int, head: bytes, content: bytes) -> None:
    """`head` then `content` to `fd`, in one writev when the kernel takes it all (no joined copy)."""
    written = os.writev(fd, (head, content))
    if written < len(head):
        view = memoryview(head[written:] + content)
    else:
        view = memoryview(content)[written - len(head):]
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: pathlib.Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
