"""Group files of the spool: several records in one file, messages leaving it one by one, and a real
SIGKILL at every step of a group commit, a removal and a dead-letter (the spool's `kill-at=` fault)."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailrelay_relay import spool

from tests.relay import faults_harness

ENVELOPE = spool.Envelope("a@example.org", ("b@example.net",))

# The child stores one group (and reports it), arms the fault, then does the step that is killed.
CHILD = textwrap.dedent("""
    import asyncio, json, pathlib, sys
    from mailrelay_relay import spool

    root, fault_file = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    action, step = sys.argv[3], sys.argv[4]
    envelope = spool.Envelope("a@example.org", ("b@example.net",))

    async def main() -> None:
        store = spool.Spool(root)
        first = await asyncio.gather(*(store.store(envelope, b"kept %d\\r\\n" % n * 500, 1.0 + n)
                                       for n in range(4)))
        print(json.dumps([m.id for m in first]), flush=True)
        if action == "remove" and step == "unlinked":  # all but the last out, then kill the last one's
            for msg in first[:3]:
                store.remove(msg)
        fault_file.write_text(f"kill-at={step}")
        if action == "store":
            await asyncio.gather(*(store.store(envelope, b"doomed %d\\r\\n" % n * 500, 10.0 + n)
                                   for n in range(4)))
        elif action == "remove":
            store.remove(first[3] if step == "unlinked" else first[0])
        else:
            store.dead_letter(first[0], "550 5.1.1 no such user")
        print("not killed", flush=True)

    asyncio.run(main())
""")


def run_child(tmp_path: pathlib.Path, action: str, step: str) -> list[str]:
    root, fault_file = tmp_path / "spool", tmp_path / "fault"
    env = dict(os.environ, **{spool.FAULT_ENV: str(fault_file)})
    done = subprocess.run([sys.executable, "-c", CHILD, str(root), str(fault_file), action, step],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)
    ids: list[str] = json.loads(done.stdout.splitlines()[0])
    return ids


@pytest.mark.parametrize("step", ["created", "first-written", "written", "synced", "renamed", "committed"])
def test_sigkill_at_every_step_of_a_group_commit(tmp_path: pathlib.Path, step: str) -> None:
    """What got its 250 (the first group) is recovered whole; the group killed mid-commit is never
    surfaced in part: not at all before its rename, whole after it (a duplicate, never a torn message)."""
    kept = run_child(tmp_path, "store", step)
    root = tmp_path / "spool"
    store = spool.Spool(root)
    got = {m.id: store.read_content(m) for m in store.recover()}
    store.close()
    kept_contents = {b"kept %d\r\n" % n * 500 for n in range(4)}
    assert set(kept) <= set(got) and {got[i] for i in kept} == kept_contents
    doomed = {got[i] for i in set(got) - set(kept)}
    if step in ("renamed", "committed"):
        assert doomed == {b"doomed %d\r\n" % n * 500 for n in range(4)}
    else:
        assert doomed == set()
    assert list((root / "tmp").iterdir()) == [] and list((root / "deadletter").iterdir()) == []
    assert faults_harness.spool_problems(root) == []


@pytest.mark.parametrize(("action", "step"), [("remove", "marked"), ("remove", "unlinked"),
                                              ("dead-letter", "dead-copied"), ("dead-letter", "dead-marked")])
def test_sigkill_while_messages_leave_a_group_file(tmp_path: pathlib.Path, action: str, step: str) -> None:
    """A message marked done is never recovered again; the last one out takes the file, and a .done left
    behind is cleared by the next recovery; a dead-letter is copied and fsynced before it is marked,
    so a kill in between keeps it queued as well (at worst handled twice, never lost)."""
    ids = run_child(tmp_path, action, step)
    root = tmp_path / "spool"
    assert len(list((root / "queue").glob("*" + spool.SUFFIX))) == (0 if step == "unlinked" else 1)
    store = spool.Spool(root)
    left = {m.id for m in store.recover()}
    if step == "marked":
        assert left == set(ids[1:])
    elif step == "unlinked":
        assert left == set() and list((root / "queue").iterdir()) == []
    elif step == "dead-copied":
        assert left == set(ids)
    else:
        assert left == set(ids[1:])
    if action == "dead-letter":
        dead = [path.name for path in (root / "deadletter").glob("*" + spool.SUFFIX)]
        assert dead == [ids[0] + spool.SUFFIX]
        assert (root / "deadletter" / (ids[0] + spool.REASON_SUFFIX)).read_text().startswith("550 5.1.1")
    assert store.usage.value == store.measure()
    assert faults_harness.spool_problems(root) == []
    store.close()


def test_a_damaged_tail_is_dead_lettered_once_and_cut_off(tmp_path: pathlib.Path) -> None:
    records = [spool.encode_record(f"ID{n}", ENVELOPE, b"body %d\r\n" % n, float(n)) for n in range(3)]
    (tmp_path / "queue").mkdir(parents=True)
    path = tmp_path / "queue" / "ID0.msg"
    path.write_bytes(b"".join(records)[:-4])
    store = spool.Spool(tmp_path)
    assert [m.id for m in store.recover()] == ["ID0", "ID1"]
    assert path.read_bytes() == records[0] + records[1]
    (reason,) = (tmp_path / "deadletter").glob("*" + spool.REASON_SUFFIX)
    assert reason.name == f"ID0-{len(records[0]) + len(records[1])}.reason"
    assert reason.read_text().startswith("corrupt: ")
    again = spool.Spool(tmp_path)
    assert [m.id for m in again.recover()] == ["ID0", "ID1"] and again.dead_letter_count() == 1
    assert [again.read_content(m) for m in again.recover()] == [b"body 0\r\n", b"body 1\r\n"]
    store.close()
    again.close()


@given(contents=st.lists(st.binary(max_size=300), min_size=1, max_size=6), cut=st.integers(min_value=0))
@settings(max_examples=150)
def test_a_cut_group_file_reads_as_a_prefix_of_its_records(contents: list[bytes], cut: int) -> None:
    """Whatever length of a group file is read, the records found are exactly the complete ones before
    the cut, in order, and a cut inside a record is reported, never read as a shorter message."""
    records = [spool.encode_record(f"ID{n}", ENVELOPE, c, float(n)) for n, c in enumerate(contents)]
    data = b"".join(records)
    cut = cut % (len(data) + 1)
    found, error, stop = spool.decode_records(data[:cut])
    ends = [sum(len(r) for r in records[:n + 1]) for n in range(len(records))]
    whole = [n for n, end in enumerate(ends) if end <= cut]
    assert [r.content for r in found] == [contents[n] for n in whole]
    assert stop == (ends[whole[-1]] if whole else 0)
    assert (error is None) == (cut in ends)


async def test_messages_delivered_together_leave_their_file_together(tmp_path: pathlib.Path) -> None:
    """A removal batch marks the messages of one shared file done in one go; the batch that holds its
    last messages takes the file and its .done; a message removed twice is no error."""
    store = spool.Spool(tmp_path)
    try:
        msgs = list(await _store_together(store, 6))
        (path,) = {m.path for m in msgs}
        assert store.remove_many(msgs[:4]) == []
        assert spool.read_done(path) == {m.id for m in msgs[:4]}
        assert [r.id for r in spool.read_queue(tmp_path)] == [m.id for m in msgs[4:]]
        assert store.usage.value == store.measure()
        assert store.remove_many(msgs[3:]) == []
        assert list((tmp_path / "queue").iterdir()) == []
        assert store.usage.value == store.measure() == 0
    finally:
        store.close()


async def _store_together(store: spool.Spool, count: int) -> list[spool.QueuedMessage]:
    stores = (store.store(ENVELOPE, b"m %d\r\n" % n, float(n)) for n in range(count))
    return list(await asyncio.gather(*stores))


def test_marked_done_stays_done_when_a_damaged_tail_leaves_one_record(tmp_path: pathlib.Path) -> None:
    """A shared file of A, B and C, with A delivered (marked done) and C damaged: recovery cuts C off and
    keeps B only; once B is delivered, the file and its .done are gone. With B marked done too, recovery
    finds nothing to deliver and removes both files at once."""
    records = [spool.encode_record(f"ID{n}", ENVELOPE, b"body %d\r\n" % n, float(n)) for n in range(3)]
    queue = tmp_path / "queue"
    queue.mkdir(parents=True)
    (queue / "ID0.msg").write_bytes(b"".join(records)[:-3])
    (queue / "ID0.done").write_bytes(b"ID0\n")
    store = spool.Spool(tmp_path)
    (left,) = store.recover()
    assert left.id == "ID1" and store.read_content(left) == b"body 1\r\n"
    store.remove(left)
    assert [p.name for p in queue.iterdir()] == []
    assert store.usage.value == store.measure()
    store.close()

    (queue / "ID5.msg").write_bytes(records[1])
    (queue / "ID5.done").write_bytes(b"ID1\n")
    again = spool.Spool(tmp_path)
    assert again.recover() == [] and [p.name for p in queue.iterdir()] == []
    again.close()
