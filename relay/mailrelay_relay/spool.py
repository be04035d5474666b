"""The durable spool: one file per group commit, written so that a 250 is only ever sent for mail on disk.

What it is for: `Spool.store()` hands the record to a group commit: one thread hop for all the messages
that arrived together, in which their records are written back to back into one file `tmp/<id>.tmp`
(named after the first of them), fdatasynced, renamed into `queue/<id>.msg`, and then the queue
directory is fsynced; only then does any of their `store()` calls return. The event loop never touches
the file. A record is:

    MAILRELAY-SPOOL 1\\n
    {"id": ..., "mail_from": ..., "rcpt_tos": [...], "mail_options": [...], "size": N,
     "received_at": T, "crc32": C}\\n
    <N bytes of content, exactly as received after dot-unstuffing>

A queue file holds one record or several back to back (a file of one record is the format of every
spool before group files, so an old spool is read as it is). A message leaves a file of its own by the
file's removal. In a shared file it is marked done by a line with its id appended to `queue/<id>.done`
(fsynced for a dead-letter, as the move it stands for is); the last one removes the file and then its
`.done`. `recover()` skips the ids marked done, removes a `.done` whose file is gone, and checks size
and CRC of every record, so a torn record can never be delivered as if it were whole: a file that does
not parse from its first byte goes to dead-letter whole, and a damaged tail after good records goes to
dead-letter as `<file id>-<offset>` and is cut off the file (reason "corrupt ..."). None of those was
answered 250, since the 250 waits for the fsyncs. `dead_letter()` moves a message to `deadletter/` (a
copy of its record, for a shared file) with its reason in `<id>.reason` alongside. `read_queue()` reads
a spool folder's queued messages without changing anything (for tools and tests).

Fault injection (tests only, honest and explicit): when the environment variable
MAILRELAY_SPOOL_FAULT_FILE names a file and that file exists, its whitespace-separated words inject
faults: `write-enospc` (writing a new group file fails with ENOSPC), `write-eio`, `fsync-eio`, `free=N`
(free_bytes() reports N), and `kill-at=<step>`: the process SIGKILLs itself at that step of a group
commit (`created`, `first-written`, `written`, `synced`, `renamed`, `committed`) or of a removal from a
shared file (`marked`, `unlinked`) or a dead-letter (`dead-copied`, `dead-marked`). Without the
variable nothing is checked.

Size limit (`--spool-max-bytes`, `max_bytes`; 0 = none): the bytes the spool holds (queue, tmp and
dead-letter files, each rounded up to whole 4 KiB blocks, as the kubelet counts an emptyDir) are
tracked in a `Usage` counter: set once by `recover()` (one walk of the directory at start), then moved
by every store, removal and dead-letter, never by walking the directory again. `store()` charges the
record before writing it and refuses with SpoolFullError when the charge would pass the limit (the
same 452 4.3.1 as a full disk); the commit settles the charges of a group to its file's real size, and
a shared file is given back when its last message leaves. `free_bytes()` is min(disk free, limit -
bytes held), so the MAIL SIZE check sees the limit too. With `--workers N` the counter lives in shared
memory created by the supervisor before it forks, so the limit holds pod-wide. Files changed by hand
while the relay runs are not seen until the next start.

What it must not do: decide SMTP replies (smtp.py maps SpoolFullError to 452 and SpoolError to 451),
deliver anything, or log message content. A shared file belongs to the process that wrote or recovered
it: two processes must never remove messages of the same file (the supervisor hands each worker whole
files).
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
import signal
import threading
import time
import zlib
from typing import Any

from mailrelay_relay import metrics

MAGIC = b"MAILRELAY-SPOOL 1\n"
SUFFIX = ".msg"
DONE_SUFFIX = ".done"
REASON_SUFFIX = ".reason"
FAULT_ENV = "MAILRELAY_SPOOL_FAULT_FILE"
FREE_MAX_AGE = 0.1  # seconds a free-space reading is reused (MAILs reserve what they declare meanwhile)
CACHE_BYTES = 64 * 1024 * 1024  # contents kept in memory for delivery, per process
IOV_MAX = 1024  # buffers per writev
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
    path: pathlib.Path  # the queue file that holds its record
    offset: int = 0  # where its record starts in that file
    length: int = 0  # the record's length in a shared file; 0: the file is the message's own


@dataclasses.dataclass(frozen=True)
class Record:
    """One record as found in a queue file."""

    id: str
    envelope: Envelope
    content: bytes
    received_at: float
    offset: int  # where the record starts in the file
    length: int  # the record's length, header and content


def encode_record(msg_id: str, envelope: Envelope, content: bytes, received_at: float) -> bytes:
    """The bytes of one record (a spool file of its own)."""
    return encode_header(msg_id, envelope, content, received_at) + content


def encode_header(msg_id: str, envelope: Envelope, content: bytes, received_at: float,
                  crc: int | None = None) -> bytes:
    """The bytes of one record before its content: the magic, the header line (with the content's
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


def _decode_at(data: bytes, offset: int) -> Record:
    """The record that starts at `offset`; CorruptRecord if it is not complete and valid."""
    if not data.startswith(MAGIC, offset):
        raise CorruptRecord("bad magic")
    end = data.find(b"\n", offset + len(MAGIC))
    if end < 0:
        raise CorruptRecord("truncated header")
    try:
        header: Any = json.loads(data[offset + len(MAGIC):end])
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
    if not (isinstance(msg_id, str) and isinstance(mail_from, str) and isinstance(size, int) and size >= 0
            and isinstance(crc, int) and all(isinstance(r, str) for r in rcpt_tos)
            and all(isinstance(o, str) for o in options)
            and len(rcpt_options) in (0, len(rcpt_tos))
            and all(isinstance(o, str) for group in rcpt_options for o in group)):
        raise CorruptRecord("bad header types")
    content = data[end + 1:end + 1 + size]
    if len(content) != size:
        raise CorruptRecord(f"size {len(content)} != {size}")
    if zlib.crc32(content) != crc:
        raise CorruptRecord("crc mismatch")
    envelope = Envelope(mail_from, rcpt_tos, options, rcpt_options)
    return Record(msg_id, envelope, content, received_at, offset, end + 1 + size - offset)


def decode_record(data: bytes) -> tuple[str, Envelope, bytes, float]:
    """Inverse of encode_record: (id, envelope, content, received_at); CorruptRecord if anything is off,
    bytes after the record included."""
    record = _decode_at(data, 0)
    if record.length != len(data):
        raise CorruptRecord(f"{len(data) - record.length} bytes after the record")
    return record.id, record.envelope, record.content, record.received_at


def decode_records(data: bytes) -> tuple[list[Record], CorruptRecord | None, int]:
    """The records of one queue file, back to back: (the good ones, the error that stopped the reading
    or None, the offset where it stopped). Nothing after a damaged record can be trusted."""
    records: list[Record] = []
    offset = 0
    while offset < len(data):
        try:
            record = _decode_at(data, offset)
        except CorruptRecord as error:
            return records, error, offset
        records.append(record)
        offset += record.length
    if not records:
        return records, CorruptRecord("empty file"), 0
    return records, None, offset


def read_done(path: pathlib.Path) -> set[str]:
    """The ids marked done in the `.done` file beside queue file `path` (whole lines only)."""
    try:
        data = path.with_suffix(DONE_SUFFIX).read_bytes()
    except FileNotFoundError:
        return set()
    return {line.decode("ascii", "replace") for line in data.split(b"\n")[:-1] if line}


def read_queue(root: pathlib.Path) -> list[Record]:
    """The messages still queued in spool folder `root`, oldest first, read without changing anything:
    the intact records of queue/, less those marked done. For tools and tests; damaged parts are left
    out here (the relay's next `recover()` dead-letters them)."""
    found: list[Record] = []
    queue_dir = pathlib.Path(root) / "queue"
    for path in sorted(queue_dir.glob("*" + SUFFIX)) if queue_dir.is_dir() else ():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        done = read_done(path)
        found.extend(r for r in decode_records(data)[0] if r.id not in done)
    found.sort(key=lambda r: (r.received_at, r.id))
    return found


@dataclasses.dataclass
class _Pending:
    msg_id: str
    envelope: Envelope
    content: bytes
    received_at: float
    faults: tuple[str, ...]
    future: asyncio.Future[None]
    charge: int = 0  # bytes reserved in Usage for this record; settled by the commit
    path: pathlib.Path | None = None  # the queue file, once committed
    offset: int = 0
    length: int = 0  # 0: the file is the message's own
    error: BaseException | None = None


@dataclasses.dataclass
class _Shared:
    """What this process knows of a shared queue file: the messages still in it, and what it takes."""

    members: set[str]
    disk: int  # the file's bytes against the size limit
    done_bytes: int = 0  # the size of its .done file


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
        self._counter = itertools.count()
        self._pid = os.getpid()
        # Contents of messages stored by this process and not yet removed, so that delivery does not
        # read back from disk what it was just handed (bounded; a miss reads the file).
        self._cache: dict[str, bytes] = {}
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()  # remove() may run in a thread (delivery batches removals)
        # The shared files this process wrote or recovered, by path; moved by the commit thread, the
        # delivery's removal thread and dead-letters on the loop, under one lock.
        self._shared: dict[pathlib.Path, _Shared] = {}
        self._shared_lock = threading.Lock()
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
        reserves the room and waits for its group. The reservation counts the widest CRC and a file of
        its own; the commit settles it to the group file's real size.
        """
        msg_id = self.new_id(received_at)
        widest = encode_header(msg_id, envelope, content, received_at, crc=0xFFFFFFFF)
        charge = disk_bytes(len(widest) + len(content))
        if not self.usage.reserve(charge, self.max_bytes):
            raise SpoolFullError(f"spool size limit: {charge} more bytes would pass the limit of "
                                 f"{self.max_bytes} (holding {self.usage.value})")
        loop = asyncio.get_running_loop()
        pending = _Pending(msg_id, envelope, content, received_at, tuple(self._faults()),
                           loop.create_future(), charge)
        self._pending.append(pending)
        if self._committer is None:
            self._committer = loop.create_task(self._commit_loop())
        await pending.future
        with self._cache_lock:
            if self._cache_bytes + len(content) <= CACHE_BYTES:
                self._cache[msg_id] = content
                self._cache_bytes += len(content)
        assert pending.path is not None
        return QueuedMessage(msg_id, envelope, len(content), received_at, pending.path, pending.offset,
                             pending.length)

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                group, self._pending = self._pending, []
                started = time.perf_counter()
                written = 0
                try:
                    written = await loop.run_in_executor(self._executor, self._commit_group, group)
                except BaseException as error:  # the thread itself failed: fail the whole group
                    for item in group:
                        if item.error is None:
                            item.error = error
                self.last_commit_seconds = time.perf_counter() - started
                self.commits += 1
                metrics.SPOOL_FSYNC_DURATION.observe(self.last_commit_seconds)
                # Settle the reservations: the file's real size if it was written, nothing if not.
                self.usage.add(written - sum(i.charge for i in group))
                for item in group:
                    if item.future.done():
                        continue
                    if item.error is None:
                        item.future.set_result(None)
                    else:
                        item.future.set_exception(_spool_error(item.error))
        finally:
            self._committer = None

    def _commit_group(self, group: list[_Pending]) -> int:
        """One file for the group: create, write, fdatasync, close, rename into the queue, fsync the
        queue directory. Returns the file's bytes against the limit; on failure every item has the error
        and nothing of the group is left on disk."""
        faults = {word for item in group for word in item.faults}
        name = group[0].msg_id
        tmp = self.tmp_dir / (name + ".tmp")
        final = self.queue_dir / (name + SUFFIX)
        buffers: list[bytes] = []
        offsets: list[int] = []
        size = 0
        for item in group:
            head = encode_header(item.msg_id, item.envelope, item.content, item.received_at)
            offsets.append(size)
            buffers += (head, item.content)
            size += len(head) + len(item.content)
        renamed = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _crash_point(faults, "created")
                if "write-enospc" in faults:
                    raise OSError(errno.ENOSPC, "injected fault: no space left on device")
                if "write-eio" in faults:
                    raise OSError(errno.EIO, "injected fault: input/output error")
                if "kill-at=first-written" in faults:
                    _write_all(fd, buffers[:2])
                    _crash_point(faults, "first-written")
                _write_all(fd, buffers)
                _crash_point(faults, "written")
                if "fsync-eio" in faults:
                    raise OSError(errno.EIO, "injected fault: fsync failed")
                os.fdatasync(fd)
                _crash_point(faults, "synced")
            finally:
                os.close(fd)
            os.rename(tmp, final)
            renamed = True
            _crash_point(faults, "renamed")
            _fsync_dir(self.queue_dir)
        except OSError as error:
            # Before the rename nothing is in the queue. After it, durability is unknown: take the file
            # back, so that a 4xx never goes with a later delivery.
            _unlink_quietly(final if renamed else tmp)
            for item in group:
                item.error = error
            return 0
        _crash_point(faults, "committed")
        disk = disk_bytes(size)
        shared = len(group) > 1
        if shared:
            with self._shared_lock:
                self._shared[final] = _Shared({item.msg_id for item in group}, disk)
        for item, offset, head in zip(group, offsets, buffers[::2], strict=True):
            item.path, item.offset = final, offset
            item.length = len(head) + len(item.content) if shared else 0
        return disk

    # -- reading, recovery, removal -------------------------------------------------------------------
    def load_file(self, path: pathlib.Path) -> list[QueuedMessage]:
        """The messages still queued in one queue file, which this process takes charge of (the ids
        marked done left out). CorruptRecord if it does not parse whole; OSError if it cannot be read."""
        path = pathlib.Path(path)
        data = path.read_bytes()
        records, error, _ = decode_records(data)
        if error is not None:
            raise error
        return self._take(path, records, len(data))

    def _take(self, path: pathlib.Path, records: list[Record], size: int) -> list[QueuedMessage]:
        if len(records) == 1 and records[0].length == size and not path.with_suffix(DONE_SUFFIX).exists():
            r = records[0]  # a file of its own (a shared one cut down to one record keeps its .done)
            return [QueuedMessage(r.id, r.envelope, len(r.content), r.received_at, path)]
        done = read_done(path)
        live = [r for r in records if r.id not in done]
        if not live:  # every message left it, and the process stopped before the file went
            _unlink_quietly(path)
            _unlink_quietly(path.with_suffix(DONE_SUFFIX))
            return []
        with self._shared_lock:
            done_bytes = _file_size(path.with_suffix(DONE_SUFFIX))
            self._shared[path] = _Shared({r.id for r in live}, disk_bytes(size), done_bytes)
        return [QueuedMessage(r.id, r.envelope, len(r.content), r.received_at, path, r.offset, r.length)
                for r in live]

    def recover(self) -> list[QueuedMessage]:
        """At start: remove tmp leftovers and `.done` files whose queue file is gone; return every
        complete message not marked done, oldest first.

        A file that does not parse from its first record goes to dead-letter whole (reason
        "corrupt: ..."); a damaged tail after good records goes to dead-letter on its own and is cut off.
        Call it only while no other process writes to this spool.
        """
        for leftover in self.tmp_dir.iterdir():
            _unlink_quietly(leftover)
        messages: list[QueuedMessage] = []
        for path in sorted(self.queue_dir.glob("*" + SUFFIX)):
            stem = path.name[: -len(SUFFIX)]
            try:
                data = path.read_bytes()
            except OSError as unreadable:
                self._move_to_deadletter(path, stem, f"corrupt: {unreadable}")
                continue
            records, damage, stop = decode_records(data)
            if damage is not None and not records:
                self._move_to_deadletter(path, stem, f"corrupt: {damage}")
                continue
            if damage is not None:
                self._cut_tail(path, data, stop, f"corrupt: {damage}")
                data = data[:stop]
            messages.extend(self._take(path, records, len(data)))
        for done in self.queue_dir.glob("*" + DONE_SUFFIX):
            if not done.with_suffix(SUFFIX).exists():
                _unlink_quietly(done)
        messages.sort(key=lambda m: (m.received_at, m.id))
        self.usage.set(self.measure())
        return messages

    def _cut_tail(self, path: pathlib.Path, data: bytes, stop: int, reason: str) -> None:
        """Dead-letter the damaged bytes of a shared file from `stop` on, then cut them off the file."""
        self._write_dead_letter(f"{path.name[: -len(SUFFIX)]}-{stop}", data[stop:], reason)
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, stop)
            os.fsync(fd)
        finally:
            os.close(fd)

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
        return decode_record(self._read_record(msg))[2]

    @staticmethod
    def _read_record(msg: QueuedMessage) -> bytes:
        if not msg.length:
            return msg.path.read_bytes()
        fd = os.open(msg.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, msg.length, msg.offset)
        finally:
            os.close(fd)

    def remove(self, msg: QueuedMessage) -> None:
        """After the upstream's 250. A message removed twice is not an error."""
        for _, error in self.remove_many([msg]):
            raise error

    def remove_many(self, msgs: list[QueuedMessage]) -> list[tuple[QueuedMessage, OSError]]:
        """Remove delivered messages: a file of its own is unlinked, and the messages of one shared file
        are marked done together (one append), or take the file with them when they are its last.
        Returns what could not be removed, with the error (such a message may be delivered again after
        a restart, never lost)."""
        failed: list[tuple[QueuedMessage, OSError]] = []
        shared: dict[pathlib.Path, list[QueuedMessage]] = {}
        for msg in msgs:
            self._forget(msg.id)
            if msg.length:
                shared.setdefault(msg.path, []).append(msg)
                continue
            try:
                size = os.stat(msg.path).st_size
                os.unlink(msg.path)
            except FileNotFoundError:
                continue
            except OSError as error:
                failed.append((msg, error))
                continue
            self.usage.add(-disk_bytes(size))
        for path, leaving in shared.items():
            try:
                self._leave_shared(path, [m.id for m in leaving], durable=False)
            except OSError as error:
                failed.extend((m, error) for m in leaving)
        return failed

    def _leave_shared(self, path: pathlib.Path, ids: list[str], *, durable: bool) -> None:
        """Mark `ids` done in shared file `path`, or remove the file (then its .done) when they are the
        last messages in it."""
        faults = self._faults()
        done_path = path.with_suffix(DONE_SUFFIX)
        with self._shared_lock:
            shared = self._shared.get(path)
            if shared is None:
                return  # removed before, or not this process's file
            leaving = [i for i in dict.fromkeys(ids) if i in shared.members]
            if not leaving:
                return
            if len(leaving) < len(shared.members):
                lines = "".join(i + "\n" for i in leaving).encode("ascii")
                fd = os.open(done_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                try:
                    _write_all(fd, [lines])
                    if durable:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                if durable and not shared.done_bytes:
                    _fsync_dir(self.queue_dir)
                shared.members.difference_update(leaving)
                before = disk_bytes(shared.done_bytes) if shared.done_bytes else 0
                shared.done_bytes += len(lines)
                self.usage.add(disk_bytes(shared.done_bytes) - before)
                _crash_point(faults, "marked")
                return
            del self._shared[path]
        # The last ones: the file goes, then its .done (a .done left alone is removed by recover()).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _crash_point(faults, "unlinked")
        _unlink_quietly(done_path)
        if durable:
            _fsync_dir(self.queue_dir)
        self.usage.add(-shared.disk - (disk_bytes(shared.done_bytes) if shared.done_bytes else 0))

    def dead_letter(self, msg: QueuedMessage, reason: str) -> None:
        """Move the message to deadletter/ and write its reason next to it (durably)."""
        self._forget(msg.id)
        if not msg.length:
            self._move_to_deadletter(msg.path, msg.id, reason)
            return
        with self._shared_lock:
            shared = self._shared.get(msg.path)
            if shared is None or msg.id not in shared.members:
                return
        self._write_dead_letter(msg.id, self._read_record(msg), reason)
        _crash_point(self._faults(), "dead-copied")
        self._leave_shared(msg.path, [msg.id], durable=True)
        _crash_point(self._faults(), "dead-marked")

    def _forget(self, msg_id: str) -> None:
        with self._cache_lock:
            content = self._cache.pop(msg_id, None)
            if content is not None:
                self._cache_bytes -= len(content)

    def _write_reason(self, msg_id: str, reason: str) -> None:
        reason_text = reason.replace("\r", " ").replace("\n", " ")
        reason_bytes = (reason_text + "\n").encode("utf-8", "backslashreplace")
        fd = os.open(self.deadletter_dir / (msg_id + REASON_SUFFIX),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, reason_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        # Dead letters stay until removed by hand, so they keep counting against the size limit.
        self.usage.add(disk_bytes(len(reason_bytes)))

    def _move_to_deadletter(self, path: pathlib.Path, msg_id: str, reason: str) -> None:
        # The message file moves (same size); the reason file is new.
        self._write_reason(msg_id, reason)
        os.rename(path, self.deadletter_dir / (msg_id + SUFFIX))
        _fsync_dir(self.deadletter_dir)
        _fsync_dir(self.queue_dir)

    def _write_dead_letter(self, name: str, data: bytes, reason: str) -> None:
        """deadletter/<name>.msg holding `data` (through tmp/, fsynced) and its reason, durably."""
        self._write_reason(name, reason)
        tmp = self.tmp_dir / (name + ".dead")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, [data])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.deadletter_dir / (name + SUFFIX))
        _fsync_dir(self.deadletter_dir)
        self.usage.add(disk_bytes(len(data)))

    def dead_letter_count(self) -> int:
        return sum(1 for entry in os.scandir(self.deadletter_dir) if entry.name.endswith(SUFFIX))

    def queue_count(self) -> int:
        """Messages queued on disk, whichever process wrote them (reads the record headers only)."""
        count = 0
        for path in self.queue_dir.glob("*" + SUFFIX):
            with contextlib.suppress(OSError):
                count += len(_record_ids(path) - read_done(path))
        return count

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


def _spool_error(error: BaseException) -> SpoolError:
    if isinstance(error, SpoolError):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(str(error))
    return SpoolError(str(error))


def _crash_point(faults: set[str] | list[str], step: str) -> None:
    """Fault injection: SIGKILL this process at `step` when the fault file asks for it."""
    if faults and f"kill-at={step}" in faults:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_all(fd: int, buffers: list[bytes]) -> None:
    """`buffers` to `fd`, back to back, with writev (IOV_MAX at a time) and no joined copy."""
    views = [memoryview(b) for b in buffers if b]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first:first + IOV_MAX])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


def _record_ids(path: pathlib.Path) -> set[str]:
    """The ids of the records in a queue file, from their headers (the contents are skipped, not read
    or checked); a damaged header ends the list."""
    ids: set[str] = set()
    with open(path, "rb") as handle:
        while handle.readline() == MAGIC:
            try:
                header = json.loads(handle.readline())
                ids.add(str(header["id"]))
                handle.seek(int(header["size"]), os.SEEK_CUR)
            except (ValueError, KeyError, TypeError):
                break
    return ids


def _file_size(path: pathlib.Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: pathlib.Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
