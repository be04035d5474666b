"""--spool-max-bytes: the spool's size limit (so a pod whose spool is an emptyDir with sizeLimit is never
evicted for outgrowing it). A real relay with its upstream down fills up to the limit, then MAIL with a
SIZE that does not fit gets 452 4.3.1 (and so does a DATA that outgrows its declared SIZE), and the
spool stays intact. The counter behind it is checked on a real directory too."""

from __future__ import annotations

import os
import pathlib

import pytest
from mailrelay_relay import spool
from mailrelay_sandbox import relayproc, smtpwire

from tests.relay import relay_harness

LIMIT = 256 * 1024
BODY = 20_000


def files_bytes(root: pathlib.Path) -> int:
    return sum(spool.disk_bytes(p.stat().st_size) for p in root.rglob("*") if p.is_file())


def check_intact(root: pathlib.Path, accepted: set[str]) -> None:
    """Every accepted message is a complete, valid record of a queue file; nothing else is queued or
    half-written."""
    store = spool.Spool(root)
    queued = set()
    for path in store.queue_dir.glob("*" + spool.SUFFIX):
        queued |= {m.id for m in store.load_file(path)}  # raises CorruptRecord if it is not whole
    assert queued == accepted
    assert list(store.tmp_dir.iterdir()) == []
    assert list(store.deadletter_dir.iterdir()) == []


def queue_id(reply: tuple[int, str]) -> str:
    code, text = reply
    assert code == 250 and "queued as" in text, reply
    return text.rsplit(" ", 1)[1]


def send(wire: smtpwire.Wire, size: int, content_size: int) -> tuple[int, str]:
    """One transaction declaring `size`, with about `content_size` bytes of content; the final reply."""
    mail = wire.cmd(f"MAIL FROM:<a@client.test> SIZE={size}")
    if mail[0] != 250:
        return mail
    assert wire.cmd("RCPT TO:<b@dest.test>")[0] == 250
    assert wire.cmd("DATA")[0] == 354
    _, content = relay_harness.message("fill", size=content_size)
    wire.send(content + b".\r\n")
    code, lines = wire.reply()
    return code, lines[-1]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_spool_limit_gets_452_and_the_spool_stays_intact(tmp_path: pathlib.Path, workers: int) -> None:
    down = f"127.0.0.1:{relayproc.free_port()}"  # nothing listens: every message stays queued
    args = ["--spool-max-bytes", str(LIMIT), "--max-message-size", "1048576"]
    relay = relay_harness.start_relay(tmp_path, down, args=args, workers=workers)
    root = relay.spool
    accepted: set[str] = set()
    try:
        refused = None
        for _ in range(40):  # 13 of 20 KB fit in 256 KiB; the sessions may land on either worker
            wire = smtpwire.Wire(relay.smtp_address)
            wire.ehlo()
            reply = send(wire, BODY, BODY)
            wire.close()
            if reply[0] != 250:
                refused = reply
                break
            accepted.add(queue_id(reply))
        assert refused == (452, "4.3.1 Error: insufficient system storage"), refused
        used = files_bytes(root)
        assert len(accepted) >= 10 and used <= LIMIT
        assert LIMIT - used < BODY + 1024  # refused because it did not fit, not earlier

        wire = smtpwire.Wire(relay.smtp_address)
        wire.ehlo()
        # A smaller message still fits, at MAIL and once written.
        small = send(wire, 500, 200)
        accepted.add(queue_id(small))
        # Under-declared: SIZE passes at MAIL, the content does not fit at the end of DATA.
        left = LIMIT - files_bytes(root)
        assert send(wire, 500, left + 4096) == (452, "4.3.1 Error: insufficient system storage")
        assert wire.cmd("NOOP")[0] == 250  # the session goes on
        wire.close()
        assert files_bytes(root) <= LIMIT
        assert relay.status()["queue"]["messages"] == len(accepted)
        check_intact(root, accepted)

        # A restart counts the spool again from disk: still full for a 20 KB message.
        assert relay.kill() == -9
        relay.restart()
        wire = smtpwire.Wire(relay.smtp_address)
        wire.ehlo()
        assert wire.line(f"MAIL FROM:<a@client.test> SIZE={BODY}") == \
            "452 4.3.1 Error: insufficient system storage"
        wire.close()
        assert relay.status()["queue"]["messages"] == len(accepted)
    finally:
        relay.kill()
    check_intact(root, accepted)


async def test_usage_follows_store_remove_dead_letter_and_recover(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "spool"
    store = spool.Spool(root, max_bytes=64 * 1024)
    envelope = spool.Envelope("a@client.test", ("b@dest.test",))
    try:
        assert store.recover() == [] and store.held_bytes == 0
        first = await store.store(envelope, b"x" * 10_000, 1.0)
        second = await store.store(envelope, b"y" * 20_000, 2.0)
        assert store.held_bytes == files_bytes(root) == 12 * 1024 + 20 * 1024
        assert store.free_bytes() == 64 * 1024 - store.held_bytes
        with pytest.raises(spool.SpoolFullError):
            await store.store(envelope, b"z" * 40_000, 3.0)  # 40 KiB more would pass 64 KiB
        assert store.held_bytes == files_bytes(root)  # nothing charged, nothing written
        store.dead_letter(first, "permanent failure: 550 5.1.1 test")
        assert store.held_bytes == files_bytes(root)
        store.remove(second)
        store.remove(second)  # twice is not an error, and not counted twice
        assert store.held_bytes == files_bytes(root) == 12 * 1024 + 4096
        fault = tmp_path / "fault"
        fault.write_text("write-eio", encoding="ascii")
        os.environ[spool.FAULT_ENV] = str(fault)
        try:
            failing = spool.Spool(root, max_bytes=64 * 1024, usage=store.usage)
            with pytest.raises(spool.SpoolError):
                await failing.store(envelope, b"w" * 1000, 4.0)
            failing.close()
        finally:
            del os.environ[spool.FAULT_ENV]
        assert store.held_bytes == files_bytes(root)  # a failed write gives its charge back
    finally:
        store.close()
    again = spool.Spool(root, max_bytes=64 * 1024)
    try:
        again.recover()
        assert again.held_bytes == files_bytes(root) == 12 * 1024 + 4096
    finally:
        again.close()


@pytest.mark.parametrize(("size", "blocks"), [(0, 1), (1, 1), (4096, 1), (4097, 2), (20_300, 5)])
def test_disk_bytes_rounds_up_to_whole_blocks(size: int, blocks: int) -> None:
    assert spool.disk_bytes(size) == blocks * spool.BLOCK
