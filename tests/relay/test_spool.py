"""The durable spool on a real file system: record round-trip, group commit, recovery, dead-letter, faults."""

from __future__ import annotations

import asyncio
import os
import pathlib
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailrelay_relay import spool

addresses = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40)


@given(
    mail_from=addresses,
    rcpts=st.lists(addresses, min_size=1, max_size=5),
    options=st.lists(st.sampled_from(["BODY=8BITMIME", "BODY=7BIT"]), max_size=1),
    content=st.binary(max_size=4096),
    received_at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_record_round_trip(mail_from: str, rcpts: list[str], options: list[str], content: bytes,
                           received_at: float) -> None:
    envelope = spool.Envelope(mail_from, tuple(rcpts), tuple(options))
    data = spool.encode_record("ID1", envelope, content, received_at)
    assert spool.decode_record(data) == ("ID1", envelope, content, received_at)


@given(content=st.binary(min_size=1, max_size=512), cut=st.integers(min_value=1, max_value=600))
@settings(max_examples=200)
def test_torn_records_are_detected(content: bytes, cut: int) -> None:
    data = spool.encode_record("ID1", spool.Envelope("a@b", ("c@d",)), content, 1.0)
    cut = min(cut, len(data) - 1)
    with pytest.raises(spool.CorruptRecord):
        spool.decode_record(data[:-cut])
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    with pytest.raises(spool.CorruptRecord):
        spool.decode_record(bytes(flipped))


async def test_store_recover_remove(tmp_path: pathlib.Path) -> None:
    sp = spool.Spool(tmp_path)
    envelope = spool.Envelope("a@b.example", ("c@d.example", "e@f.example"), ("BODY=8BITMIME",))
    msg = await sp.store(envelope, b"Subject: x\r\n\r\nhello\r\n", 1000.0)
    assert msg.path.parent == tmp_path / "queue" and msg.path.exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert sp.read_content(msg) == b"Subject: x\r\n\r\nhello\r\n"
    again = spool.Spool(tmp_path).recover()
    assert again == [msg]
    sp.remove(msg)
    sp.remove(msg)  # twice is fine
    assert spool.Spool(tmp_path).recover() == []
    sp.close()


async def test_group_commit_shares_commits(tmp_path: pathlib.Path) -> None:
    sp = spool.Spool(tmp_path)
    envelope = spool.Envelope("a@b.example", ("c@d.example",))
    messages = await asyncio.gather(*(sp.store(envelope, b"m%d\r\n" % n, 1000.0 + n) for n in range(200)))
    assert len({m.id for m in messages}) == 200
    assert sp.commits < 200  # concurrent stores share commits
    recovered = spool.Spool(tmp_path).recover()
    assert [m.id for m in recovered] == [m.id for m in messages]  # oldest first
    assert {sp.read_content(m) for m in recovered} == {b"m%d\r\n" % n for n in range(200)}
    sp.close()


def test_recover_cleans_tmp_and_dead_letters_corrupt(tmp_path: pathlib.Path) -> None:
    sp = spool.Spool(tmp_path)
    (tmp_path / "tmp" / "half.tmp").write_bytes(b"MAILRELAY-SPOOL 1\n{")
    good = spool.encode_record("GOOD", spool.Envelope("", ("c@d.example",)), b"x\r\n", 5.0)
    (tmp_path / "queue" / "GOOD.msg").write_bytes(good)
    (tmp_path / "queue" / "TORN.msg").write_bytes(good[:-1])
    recovered = sp.recover()
    assert [m.id for m in recovered] == ["GOOD"]
    assert list((tmp_path / "tmp").iterdir()) == []
    assert sp.dead_letter_count() == 1
    assert (tmp_path / "deadletter" / "TORN.reason").read_text().startswith("corrupt: ")
    sp.close()


async def test_dead_letter_keeps_message_and_reason(tmp_path: pathlib.Path) -> None:
    sp = spool.Spool(tmp_path)
    msg = await sp.store(spool.Envelope("a@b.example", ("c@d.example",)), b"body\r\n", 1.0)
    sp.dead_letter(msg, "550 5.1.1 no such user\r\nINJECTED")
    assert not msg.path.exists()
    assert sp.dead_letter_count() == 1
    moved = tmp_path / "deadletter" / (msg.id + ".msg")
    assert spool.decode_record(moved.read_bytes())[2] == b"body\r\n"
    reason = (tmp_path / "deadletter" / (msg.id + ".reason")).read_text()
    assert reason == "550 5.1.1 no such user  INJECTED\n"
    assert sp.recover() == []
    sp.close()


@pytest.mark.parametrize(("fault", "error"), [("write-enospc", spool.SpoolFullError),
                                              ("write-eio", spool.SpoolError),
                                              ("fsync-eio", spool.SpoolError)])
async def test_injected_faults_leave_the_spool_intact(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                      fault: str, error: type[Exception]) -> None:
    fault_file = tmp_path / "fault"
    monkeypatch.setenv(spool.FAULT_ENV, str(fault_file))
    sp = spool.Spool(tmp_path / "spool")
    envelope = spool.Envelope("a@b.example", ("c@d.example",))
    kept = await sp.store(envelope, b"before\r\n", 1.0)
    fault_file.write_text(fault)
    with pytest.raises(error) as raised:
        await sp.store(envelope, b"during\r\n", 2.0)
    assert isinstance(raised.value, spool.SpoolFullError) == (fault == "write-enospc")
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    os.unlink(fault_file)
    after = await sp.store(envelope, b"after\r\n", 3.0)
    recovered = spool.Spool(tmp_path / "spool").recover()
    assert [m.id for m in recovered] == [kept.id, after.id]
    sp.close()


def test_free_bytes_fault_and_real(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault_file = tmp_path / "fault"
    monkeypatch.setenv(spool.FAULT_ENV, str(fault_file))
    sp = spool.Spool(tmp_path / "spool")
    assert sp.free_bytes() > 0
    fault_file.write_text("free=123")
    assert sp.free_bytes() == 123
    sp.close()


async def test_content_cache_is_bounded_and_released(tmp_path: pathlib.Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "CACHE_BYTES", 1000)
    sp = spool.Spool(tmp_path)
    envelope = spool.Envelope("a@b.example", ("c@d.example",))
    messages = await asyncio.gather(*(sp.store(envelope, b"x" * 300, float(n)) for n in range(10)))
    assert sp._cache_bytes <= 1000 and len(sp._cache) == 3
    # cached or not, the content is the same as on disk
    assert all(sp.read_content(m) == b"x" * 300 for m in messages)
    await asyncio.gather(*(asyncio.to_thread(sp.remove, m) for m in messages[:5]))
    sp.dead_letter(messages[5], "550 no")
    for m in messages[6:]:
        sp.remove(m)
    assert (sp._cache_bytes, sp._cache) == (0, {})
    assert sp.recover() == []
    sp.close()


@pytest.mark.parametrize("size", [0, 1, 3000, 4000, 100 * 1024])
async def test_the_size_accounting_matches_the_files_whatever_the_crc(tmp_path: pathlib.Path,
                                                                   size: int) -> None:
    """The reservation counts the widest CRC-32 and the commit settles it to the file's real size, so the
    running count always equals what the files hold, and removing them brings it back to zero."""
    store = spool.Spool(tmp_path)
    try:
        messages = [await store.store(spool.Envelope("a@example.org", ("b@example.net",)),
                                      bytes([n]) * size, 1.0) for n in range(8)]
        assert store.usage.value == store.measure() > 0
        assert [len(r.content) for r in spool.read_queue(tmp_path)] == [size] * 8
        for msg in messages:
            store.remove(msg)
        assert store.usage.value == store.measure() == 0
    finally:
        store.close()


@pytest.mark.parametrize("size", [0, 1, 3000, 100 * 1024])
async def test_the_size_accounting_of_a_group_file_follows_its_messages_out(tmp_path: pathlib.Path,
                                                                          size: int) -> None:
    """Stored together, messages share one file: the count settles to that file, grows with its .done
    file, and comes back to zero when the last message (delivered or dead-lettered) takes the file."""
    store = spool.Spool(tmp_path)
    try:
        messages = await asyncio.gather(*(store.store(spool.Envelope("a@example.org", ("b@example.net",)),
                                                      bytes([n]) * size, 1.0 + n) for n in range(8)))
        assert len({m.path for m in messages}) < 8, "the stores were not grouped"
        assert store.usage.value == store.measure() > 0
        for n, msg in enumerate(reversed(messages)):
            if n % 3 == 1:
                store.dead_letter(msg, "550 no")
            else:
                store.remove(msg)
            assert store.usage.value == store.measure()
            assert spool.Spool(tmp_path).queue_count() == 7 - n  # as another process counts them
        assert list((tmp_path / "queue").iterdir()) == []
        assert store.dead_letter_count() == 3
        assert sorted(len(content) for _, content in _dead(tmp_path)) == [size] * 3
    finally:
        store.close()


def _dead(root: pathlib.Path) -> list[tuple[str, bytes]]:
    return [(path.name, spool.decode_record(path.read_bytes())[2])
            for path in sorted((root / "deadletter").glob("*" + spool.SUFFIX))]


async def test_a_record_that_fills_its_last_block_exactly_is_charged_one_block(
    tmp_path: pathlib.Path,
) -> None:
    """The widest CRC (10 digits) would spill such a record, whose CRC has 9 digits or fewer, into a
    second block: the commit settles the charge to one."""
    store = spool.Spool(tmp_path)
    envelope = spool.Envelope("a@example.org", ("b@example.net",))

    def content(size: int) -> bytes:  # `size` bytes whose CRC-32 has 9 digits (a header 1 byte narrower)
        return next(body for n in range(1000)
                    if 10**8 <= zlib.crc32(body := b"x" * (size - 3) + b"%03d" % n) < 10**9)

    try:
        msg_id = store.new_id(1.0)  # the ids of one store have one length
        body = next(body for size in range(3800, spool.BLOCK) if len(
            spool.encode_header(msg_id, envelope, body := content(size), 1.0)) + size == spool.BLOCK)
        widest = spool.encode_header(store.new_id(1.0), envelope, body, 1.0, crc=0xFFFFFFFF)
        assert len(widest) + len(body) > spool.BLOCK  # the reservation alone would charge two blocks
        msg = await store.store(envelope, body, 1.0)
        assert msg.path.stat().st_size == spool.BLOCK
        assert store.usage.value == spool.BLOCK == store.measure()
    finally:
        store.close()
