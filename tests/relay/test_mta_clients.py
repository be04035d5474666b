"""Real MTAs as the relay's clients: the queueing mail servers applications hand mail through (Postfix,
Exim, OpenSMTPD, nullmailer, dma; mailrelay_sandbox.mtas runs each with a private configuration) send
through a relay that is drained part-way, through a relay at its session cap, and meet each 4xx the
relay answers. Every message must reach the upstream sink exactly once (by Message-ID and recipient),
with nothing left in the client's queue; the MTA's queue runs are forced instead of waiting out its
backoff. msmtp, which has no queue, is measured too.

Between the MTA and the relays sits a recording proxy (tests/relay/smtp_tap.py). It plays the part of
the Kubernetes Service (new connections go to whichever relay it points at: a drained relay is taken out
and another takes over), keeps each session's commands and replies, and lets a test act at an exact
point of a real MTA's session (drain the relay as it accepts the K-th message, before the MTA sees that
250).

These runs measure the "Clients in the wild" matrix of docs/relay.md: `REACTIONS` is what each MTA does
after each refusal, the tests check each cell on the real MTA, and test_the_docs_show_the_measured_matrix
keeps the page equal to `REACTIONS`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence

import pytest
from mailrelay_sandbox import mtas, relayproc, smtpwire, waiting
from mailrelay_sandbox import sink as sinkmod

from tests.conftest import REPO_ROOT, missing
from tests.relay.relay_harness import start_relay
from tests.relay.smtp_tap import Reply, Session, Tap

N = 20  # messages per run
K = 5  # the relay is drained as it accepts the K-th
WAIT = 120.0  # generous: a loaded 2-core machine, and an MTA's own delays (OpenSMTPD's: 10 to 15 s)

CELLS = ("421 at the greeting", "421 at the next MAIL", "452 at RCPT", "455 at MAIL",
         "451 at the end of DATA")


@dataclasses.dataclass(frozen=True)
class Reaction:
    """What an MTA does after a refusal: `next`, its next command on that connection ("DATA": it sends
    the message, to the recipients accepted; None: it closes without one); `then`, what becomes of the
    refused message: "later" (kept, tried again at its next queue run), "same connection" (tried again
    at once in a new transaction of the same session), "reconnects" (kept in flight, a new connection
    within seconds, again and again), "never passes" (the whole message again each time, refused each
    time), or "n/a" (the situation cannot arise with this MTA). `text` is its cell in docs/relay.md."""

    next: str | None
    then: str
    text: str
    certain: bool = True  # False: the tests see it only when the MTA happens to reuse a connection


NA_ONE_MESSAGE = Reaction(None, "n/a", "does not arise: one message per connection")
REACTIONS: dict[str, dict[str, Reaction]] = {
    "postfix": {
        "421 at the greeting": Reaction("QUIT", "later", "QUIT; deferred, with every message for the relay"),
        "421 at the next MAIL": Reaction(None, "later", "closes; deferred", certain=False),
        "452 at RCPT": Reaction("DATA", "later", "sends to the accepted recipients; the others deferred"),
        "455 at MAIL": Reaction("RSET", "later", "RSET, QUIT; deferred"),
        "451 at the end of DATA": Reaction("QUIT", "later", "QUIT; deferred"),
    },
    "exim": {
        "421 at the greeting": Reaction("QUIT", "later", "QUIT; deferred"),
        "421 at the next MAIL": Reaction("QUIT", "later",
                                         "QUIT; deferred; the queue run's next messages connect anew"),
        "452 at RCPT": Reaction("DATA", "same connection",
                                "sends to the accepted recipients, then the others in a new transaction "
                                "on the same connection"),
        "455 at MAIL": Reaction("QUIT", "later", "QUIT; deferred"),
        "451 at the end of DATA": Reaction("QUIT", "later", "QUIT; deferred"),
    },
    "opensmtpd": {
        "421 at the greeting": Reaction(None, "later",
                                        "closes; its route to the relay disabled for 15 s, the messages "
                                        "deferred (while another connection to it works: reconnects "
                                        "every 5 s)"),
        "421 at the next MAIL": Reaction("RSET", "reconnects",
                                         "RSET on the closed connection; reconnects every 5 s, the "
                                         "messages kept in flight"),
        "452 at RCPT": Reaction("DATA", "later", "sends to the accepted recipients; the others deferred"),
        "455 at MAIL": Reaction("RSET", "later", "RSET, QUIT; deferred"),
        "451 at the end of DATA": Reaction("QUIT", "later",
                                           "QUIT once the idle connection times out; deferred"),
    },
    "nullmailer": {
        "421 at the greeting": Reaction("QUIT", "later", "QUIT; deferred"),
        "421 at the next MAIL": NA_ONE_MESSAGE,
        "452 at RCPT": Reaction("QUIT", "never passes",
                                "QUIT; the whole message deferred, every recipient sent again each "
                                "time: more recipients than `--max-recipients` never pass"),
        "455 at MAIL": Reaction("QUIT", "later", "QUIT; deferred"),
        "451 at the end of DATA": Reaction("QUIT", "later", "QUIT; deferred"),
    },
    "dma": {
        "421 at the greeting": Reaction(None, "later", "closes; deferred"),
        "421 at the next MAIL": NA_ONE_MESSAGE,
        "452 at RCPT": Reaction(None, "n/a", "does not arise: one recipient per transaction"),
        "455 at MAIL": Reaction(None, "later", "closes; deferred"),
        "451 at the end of DATA": Reaction(None, "later", "closes; deferred"),
    },
}

TIGHT = 200_000  # the tight relay's --max-inflight-bytes

# msmtp: no queue, its exit code is all the application gets (EX_TEMPFAIL would be 75)
MSMTP_EXITS = {"421 at the greeting": 76, "452 at RCPT": 69, "455 at MAIL": 69, "451 at the end of DATA": 69}


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sink() -> Iterator[sinkmod.Sink]:
    with sinkmod.running() as s:
        yield s


@pytest.fixture(scope="module")
def relays(tmp_path_factory: pytest.TempPathFactory,
           sink: sinkmod.Sink) -> Iterator[dict[str, relayproc.RelayProcess]]:
    """Relays shared by the module: `main` (defaults; its spool fails on demand through the fault file),
    `capped` (--max-sessions 2), `strict` (--max-recipients 1) and `tight` (--max-inflight-bytes)."""
    folder = tmp_path_factory.mktemp("relays")
    started: dict[str, relayproc.RelayProcess] = {}
    flags = {"main": [], "capped": ["--max-sessions", "2"], "strict": ["--max-recipients", "1"],
             "tight": ["--max-inflight-bytes", str(TIGHT)]}
    try:
        for name, args in flags.items():
            env = {"MAILRELAY_SPOOL_FAULT_FILE": str(folder / "fault")} if name == "main" else None
            started[name] = start_relay(folder, sink.address, name=name, args=args, env=env)
        yield started
    finally:
        for relay in started.values():
            relay.kill()


def fault_file(relays: dict[str, relayproc.RelayProcess]) -> pathlib.Path:
    return pathlib.Path(relays["main"].env["MAILRELAY_SPOOL_FAULT_FILE"])


@pytest.fixture(scope="module")
def tap(relays: dict[str, relayproc.RelayProcess]) -> Iterator[Tap]:
    with Tap(relays["main"].smtp_address) as running:
        yield running


@pytest.fixture(scope="module")
def mta_folder() -> Iterator[pathlib.Path]:
    """Where the MTAs keep their configuration and queues (mtas.scratch: removed at the end)."""
    with mtas.scratch() as folder:
        yield folder


@pytest.fixture(scope="module", params=[cls.name for cls in mtas.CLIENTS])
def client(request: pytest.FixtureRequest, mta_folder: pathlib.Path, tap: Tap) -> Iterator[mtas.ClientMTA]:
    """One MTA of each kind for the module, relaying everything to the tap."""
    cls = {c.name: c for c in mtas.CLIENTS}[request.param]
    problem = cls.missing()
    if problem is not None:
        missing(problem)
    mta = cls(mta_folder / cls.name, tap.address)
    mta.start()
    try:
        yield mta
    finally:
        mta.stop()


class World:
    """One test's view: the MTA, the tap, the sink and the module's relays."""

    def __init__(self, client: mtas.ClientMTA, tap: Tap, sink: sinkmod.Sink,
                 relays: dict[str, relayproc.RelayProcess]) -> None:
        self.client = client
        self.tap = tap
        self.sink = sink
        self.relays = relays
        self.extra_relays: list[relayproc.RelayProcess] = []

    @property
    def name(self) -> str:
        return self.client.name

    def reaction(self, cell: str) -> Reaction:
        return REACTIONS[self.name][cell]

    def relay(self, tmp_path: pathlib.Path, name: str, args: Sequence[str] = ()) -> relayproc.RelayProcess:
        """A relay of this test's own (one it drains and stops)."""
        relay = start_relay(tmp_path, self.sink.address, name=name, args=args)
        self.extra_relays.append(relay)
        return relay

    def received(self) -> collections.Counter[tuple[str | None, str]]:
        """(Message-ID, recipient) of every copy at the sink, counted."""
        out: collections.Counter[tuple[str | None, str]] = collections.Counter()
        for m in self.sink.messages:
            for rcpt in m.rcpt_tos:
                out[(mtas.message_id(m.content), rcpt)] += 1
        return out

    def explain(self) -> str:
        return (f"\n{self.name}: queued {self.client.queued()}, deferred {self.client.deferred()}, "
                f"at the sink {sorted(self.received().items())}\n"
                f"sessions seen by the tap:\n{self.tap.transcripts()}\n"
                f"{self.client.state_text()}\n"
                f"{self.name}'s log (end):\n{self.client.log_text()[-3000:]}")

    def wait(self, predicate: Callable[[], object], what: str, *, flush: bool = False) -> None:
        """Wait for `predicate`; with `flush`, force the MTA's queue run every 2 s meanwhile."""
        try:
            waiting.wait_until(lambda: bool(predicate()), within=WAIT, what=what,
                               between=self.client.flush if flush else None, between_every=2.0)
        except TimeoutError as error:
            raise AssertionError(f"{error}{self.explain()}") from None

    def deliver_all(self, msgs: Sequence[mtas.Message]) -> None:
        """Force queue runs until every (message, recipient) is at the sink, the MTA's queue is empty
        and no relay holds anything; then each must have arrived exactly once, and nothing else."""
        expected = {(m.msg_id, rcpt) for m in msgs for rcpt in m.recipients}
        running = [r for r in [*self.relays.values(), *self.extra_relays] if r.running]

        def done() -> bool:
            return (set(self.received()) >= expected and self.client.queued() == 0
                    and all(r.status()["queue"]["messages"] == 0 for r in running))

        self.client.flush()
        self.wait(done, "every message at the sink and the MTA's queue empty", flush=True)
        received = self.received()
        duplicates = {key: n for key, n in received.items() if n > 1}
        assert not duplicates, f"delivered more than once: {duplicates}{self.explain()}"
        extra = set(received) - expected
        contents = [m.content[:1500].decode(errors="replace") for m in self.sink.messages
                    if mtas.message_id(m.content) in {mid for mid, _ in extra}]
        assert not extra, f"unexpected messages at the sink: {extra}\n{contents}{self.explain()}"

    # -- what the tap saw -------------------------------------------------------------------------

    def refused(self, verb: str, code: int) -> list[tuple[Session, int]]:
        """(session, index of the reply in its events) of each `code` reply to `verb`."""
        return [(s, i) for s in self.tap.sessions for i, e in enumerate(s.events)
                if isinstance(e, Reply) and e.verb == verb and e.code == code]

    def check_next(self, cell: str, verb: str, code: int) -> None:
        """Every `code` reply to `verb` was followed, on its connection, by the documented next command."""
        expected = self.reaction(cell).next
        refusals = self.refused(verb, code)
        assert refusals, f"no {code} to {verb} seen{self.explain()}"
        for session, index in refusals:
            def moved(session: Session = session, index: int = index) -> bool:
                return session.closed or next_command(session, index) is not None

            self.wait(moved, f"{self.name}'s next move after {code} at {verb}")
            seen = next_command(session, index)
            assert seen == expected, (f"{cell}: after {code} at {verb} {self.name} sent {seen!r}, "
                                      f"REACTIONS says {expected!r}{self.explain()}")


def answered(session: Session, index: int) -> int | None:
    """The event index of the command that the reply at event `index` answers (None: the greeting)."""
    replies_before = sum(1 for e in session.events[:index] if isinstance(e, Reply))  # the greeting: 0
    commands = [i for i, e in enumerate(session.events) if isinstance(e, str)]
    return commands[replies_before - 1] if 0 < replies_before <= len(commands) else None


def next_command(session: Session, index: int) -> str | None:
    """What the client sent next after the reply at event `index`: its first command after it saw the
    reply, else (it closed) a QUIT or RSET it had pipelined right behind the refused command (Postfix and
    Exim send QUIT with the final dot). "DATA" stands for the message's content."""
    def name(line: str) -> str:
        return "DATA" if line == "." else line.split(" ")[0].split(":")[0].upper()

    for event in session.events[index + 1:]:
        if isinstance(event, str):
            return name(event)
    refused_at = answered(session, index)
    if refused_at is None:
        return None
    for event in session.events[refused_at + 1:index]:
        if isinstance(event, str) and name(event) in ("QUIT", "RSET"):
            return name(event)
    return None


@pytest.fixture
def world(client: mtas.ClientMTA, tap: Tap, sink: sinkmod.Sink,
          relays: dict[str, relayproc.RelayProcess]) -> Iterator[World]:
    """A clean start for each test: the MTA's queue empty, the tap pointing at the main relay with
    nothing recorded, the sink emptied, no spool fault."""
    assert client.queued() == 0, f"{client.name} still holds mail from an earlier test"
    tap.reset(relays["main"].smtp_address)
    fault_file(relays).unlink(missing_ok=True)
    sink.reset()
    world = World(client, tap, sink, relays)
    try:
        yield world
    finally:
        # the MTA's cached connections close on their own (Postfix keeps one 2 s, OpenSMTPD for its
        # session-keepalive); cut, one would cost the next test an error on it and the MTA's wait after it
        with contextlib.suppress(TimeoutError):
            waiting.wait_until(lambda: tap.open_sessions() == 0, within=30,
                               what="the MTA's connections closed")
        tap.reset(relays["main"].smtp_address)
        fault_file(relays).unlink(missing_ok=True)
        for relay in world.extra_relays:
            relay.kill()


# -- N messages: drained part-way; at the session cap, then drained in the queue run ----------------------

def drain_at(world: World, relay: relayproc.RelayProcess, k: int) -> None:
    """Drain `relay` as it accepts the k-th message through the tap, before the MTA sees that 250."""
    def hook(session: Session, reply: Reply) -> None:
        if reply.verb == "." and reply.code == 250 and world.tap.count(".", 250) == k:
            relay.drain()

    world.tap.on_reply = hook


def finish_drain(world: World, relay: relayproc.RelayProcess, *, part_way: bool) -> int:
    """Wait until `relay` is drained and what it accepted is delivered (with `part_way`: and it has
    refused the MTA); take it out of the Service (the tap: new connections go to the main relay), stop it
    (SIGTERM: exit 0 at once, nothing left) and return how many messages it accepted."""
    def drained() -> bool:
        refused = world.refused("CONNECT", 421) or world.refused("MAIL", 421)
        return (relay.status()["drained"] and world.sink.count == world.tap.count(".", 250)
                and (bool(refused) or not part_way))

    world.wait(drained, "the relay drained and what it accepted delivered", flush=True)
    accepted = world.sink.count
    world.tap.upstream = world.relays["main"].smtp_address  # new connections only; the record stays
    assert relay.stop(timeout=60) == 0
    if part_way:
        assert K <= accepted < N, f"not drained part-way: {accepted} of {N} accepted{world.explain()}"
    return accepted


def test_drained_part_way(world: World, tmp_path: pathlib.Path) -> None:
    """N messages handed to the MTA, which sends them at once; the relay is drained as it accepts the
    K-th. Sessions greeted before the drain finish one transaction, then get 421 at their next MAIL; new
    ones get 421 at the greeting. Once drained, the relay leaves the Service and is stopped; the MTA's
    forced queue runs bring the rest through another relay."""
    client = world.client
    draining = world.relay(tmp_path, "draining", ["--drain-grace", "1"])
    world.tap.reset(draining.smtp_address)
    drain_at(world, draining, K)
    msgs = [mtas.message(f"{client.name} drained part-way {i}") for i in range(N)]
    for msg in msgs:
        client.submit(msg)
    finish_drain(world, draining, part_way=True)
    if world.refused("CONNECT", 421):
        world.check_next("421 at the greeting", "CONNECT", 421)
    if world.refused("MAIL", 421):
        world.check_next("421 at the next MAIL", "MAIL", 421)
    world.deliver_all(msgs)


def test_session_cap_then_drained_in_the_queue_run(world: World, tmp_path: pathlib.Path) -> None:
    """The relay is at --max-sessions (the test holds its sessions): the MTA gets 421 at the greeting
    and keeps every message. Then a relay with room takes over and is drained as it accepts the K-th
    message of the forced queue run: an MTA that sends several messages down one connection meets 421
    at the next MAIL there (one that opens a connection per message at once has them all greeted
    before the drain, and each gets its one transaction)."""
    client = world.client
    capped = world.relays["capped"]
    reaction = world.reaction("421 at the greeting")
    world.wait(lambda: capped.status()["sessions"] == 0, "the capped relay free")
    held = [smtpwire.Wire(capped.smtp_address) for _ in range(2)]
    try:
        assert all(w.greeting is not None and w.greeting[0] == 220 for w in held)
        world.tap.reset(capped.smtp_address)
        msgs = [mtas.message(f"{client.name} at the cap {i}") for i in range(N)]
        for msg in msgs:
            client.submit(msg)
        assert reaction.then == "later"
        world.wait(lambda: client.deferred() == N, "the MTA deferring every message (its own account)")
        assert client.queued() == N and world.tap.count(".", 250) == 0 and world.sink.count == 0
        assert {r.verb for _, r in world.tap.replies() if r.code >= 400} == {"CONNECT"}
        world.check_next("421 at the greeting", "CONNECT", 421)
    finally:
        for w in held:
            w.cmd("QUIT")
            w.close()

    draining = world.relay(tmp_path, "draining", ["--drain-grace", "1"])
    world.tap.reset(draining.smtp_address)
    drain_at(world, draining, K)
    client.flush()
    finish_drain(world, draining, part_way=False)
    reaction = world.reaction("421 at the next MAIL")
    if reaction.then == "n/a":
        assert all(s.commands().count("MAIL") <= 1 for s in world.tap.sessions)
    elif reaction.certain or world.refused("MAIL", 421):
        world.check_next("421 at the next MAIL", "MAIL", 421)
        if reaction.then == "later":
            assert client.deferred() >= 1, f"nothing deferred after the 421 at MAIL{world.explain()}"
    world.deliver_all(msgs)


# -- one refusal at a time: the rest of the matrix -----------------------------------------------------

def check_then(world: World, cell: str, msg: mtas.Message, *, refused_rcpt: str | None = None) -> None:
    """Wait for the evidence of the documented `then` (the MTA's own account, or the tap's record)."""
    then = world.reaction(cell).then
    client, tap = world.client, world.tap
    if then == "later":
        world.wait(lambda: client.deferred() >= 1, f"{world.name} deferring the message (its own account)")
        if refused_rcpt is not None:
            assert (msg.msg_id, refused_rcpt) not in world.received()
    elif then == "same connection":
        assert refused_rcpt is not None
        world.wait(lambda: (msg.msg_id, refused_rcpt) in world.received(), "the refused recipient delivered")
        carrying = [s for s in tap.sessions if s.accepted]
        assert len(carrying) == 1 and carrying[0].accepted == 2, (
            f"not on the same connection{world.explain()}")
    elif then == "never passes":
        world.wait(lambda: len(world.refused("RCPT", 452)) >= 2 and client.deferred() >= 1,
                   f"{world.name} sending the whole message again, refused again", flush=True)
        assert tap.count(".", 250) == 0 and not world.received()
    else:
        raise AssertionError(f"no check for {then!r}")


def test_452_at_rcpt(world: World) -> None:
    """A message with two recipients through a relay taking one per message (--max-recipients 1)."""
    cell = "452 at RCPT"
    world.tap.reset(world.relays["strict"].smtp_address)
    msg = mtas.message(f"{world.name} 452", recipients=("first@dest.test", "second@dest.test"))
    world.client.submit(msg)
    if world.reaction(cell).then == "n/a":  # one recipient per transaction: never more than one RCPT
        world.wait(lambda: set(world.received()) == {(msg.msg_id, r) for r in msg.recipients},
                   "both recipients delivered", flush=True)
        assert not world.refused("RCPT", 452)
        assert all(s.commands().count("RCPT") <= 1 for s in world.tap.sessions)
    else:
        world.wait(lambda: world.refused("RCPT", 452), "a 452 at RCPT", flush=True)
        world.check_next(cell, "RCPT", 452)
        session, index = world.refused("RCPT", 452)[0]
        command = session.events[answered(session, index) or 0]
        assert isinstance(command, str)
        refused_rcpt = re.sub(r"^RCPT TO:<([^>]*)>.*", r"\1", command, flags=re.IGNORECASE)
        assert refused_rcpt in msg.recipients, command
        check_then(world, cell, msg, refused_rcpt=refused_rcpt)
    world.tap.reset(world.relays["main"].smtp_address)
    world.deliver_all([msg])


def test_455_at_mail(world: World) -> None:
    """Another transaction (the test's) holds all of --max-inflight-bytes: the MTA's MAIL gets 455."""
    cell = "455 at MAIL"
    tight = world.relays["tight"]
    holder = smtpwire.Wire(tight.smtp_address)
    try:
        holder.ehlo()
        assert holder.cmd(f"MAIL FROM:<holder@client.test> SIZE={TIGHT}")[0] == 250
        world.tap.reset(tight.smtp_address)
        msg = mtas.message(f"{world.name} 455")
        world.client.submit(msg)
        world.wait(lambda: world.refused("MAIL", 455), "a 455 at MAIL", flush=True)
        world.check_next(cell, "MAIL", 455)
        check_then(world, cell, msg)
    finally:
        holder.cmd("QUIT")
        holder.close()
    world.deliver_all([msg])


def test_451_at_the_end_of_data(world: World) -> None:
    """The relay's spool write fails (MAILRELAY_SPOOL_FAULT_FILE): 451 at the end of DATA."""
    cell = "451 at the end of DATA"
    fault = fault_file(world.relays)
    fault.write_text("write-eio")
    msg = mtas.message(f"{world.name} 451")
    world.client.submit(msg)
    world.wait(lambda: world.refused(".", 451), "a 451 at the end of DATA", flush=True)
    world.check_next(cell, ".", 451)
    check_then(world, cell, msg)
    fault.unlink()
    world.deliver_all([msg])


# -- msmtp: no queue ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def msmtp(tmp_path_factory: pytest.TempPathFactory) -> Callable[[tuple[str, int]], mtas.Msmtp]:
    problem = mtas.Msmtp.missing()
    if problem is not None:
        missing(problem)
    folder = tmp_path_factory.mktemp("msmtp")
    return lambda upstream: mtas.Msmtp(folder, upstream)


def test_msmtp_gets_no_queue_and_a_failing_exit_code(
    msmtp: Callable[[tuple[str, int]], mtas.Msmtp], relays: dict[str, relayproc.RelayProcess],
    sink: sinkmod.Sink, tmp_path: pathlib.Path,
) -> None:
    """msmtp sends at once and keeps nothing: after a refusal its exit code is all the application gets,
    69 (EX_UNAVAILABLE) after a 4xx at MAIL, RCPT or DATA and 76 (EX_PROTOCOL) after a 421 greeting,
    never 75 (EX_TEMPFAIL); the message is not sent. A drain shows as the 421 at the greeting."""
    sink.reset()
    sent: list[tuple[str, mtas.MsmtpResult, mtas.Message]] = []
    capped = relays["capped"]
    waiting.wait_until(lambda: capped.status()["sessions"] == 0, within=WAIT, what="the capped relay free")
    held = [smtpwire.Wire(capped.smtp_address) for _ in range(2)]
    try:
        msg = mtas.message("msmtp at the cap")
        sent.append(("421 at the greeting", msmtp(capped.smtp_address).send(msg), msg))
    finally:
        for w in held:
            w.cmd("QUIT")
            w.close()
    msg = mtas.message("msmtp 452", recipients=("first@dest.test", "second@dest.test"))
    sent.append(("452 at RCPT", msmtp(relays["strict"].smtp_address).send(msg), msg))
    holder = smtpwire.Wire(relays["tight"].smtp_address)
    try:
        holder.ehlo()
        assert holder.cmd(f"MAIL FROM:<holder@client.test> SIZE={TIGHT}")[0] == 250
        msg = mtas.message("msmtp 455")
        sent.append(("455 at MAIL", msmtp(relays["tight"].smtp_address).send(msg), msg))
    finally:
        holder.cmd("QUIT")
        holder.close()
    fault = fault_file(relays)
    fault.write_text("write-eio")
    try:
        msg = mtas.message("msmtp 451")
        sent.append(("451 at the end of DATA", msmtp(relays["main"].smtp_address).send(msg), msg))
    finally:
        fault.unlink()
    draining = start_relay(tmp_path, sink.address, name="draining")
    try:
        draining.drain()
        msg = mtas.message("msmtp drained")
        result = msmtp(draining.smtp_address).send(msg)
        assert result.exit_code == MSMTP_EXITS["421 at the greeting"], result
        assert "421 4.3.2" in result.output and "Service shutting down" in result.output
    finally:
        draining.kill()
    for cell, result, _ in sent:
        assert result.exit_code == MSMTP_EXITS[cell], (cell, result)
    msg = mtas.message("msmtp ok")
    assert msmtp(relays["main"].smtp_address).send(msg).exit_code == 0
    assert sink.wait_for(1, timeout=WAIT)
    assert {mtas.message_id(m.content) for m in sink.messages} == {msg.msg_id}  # the refused ones: never sent


# -- the docs -----------------------------------------------------------------------------------------

def matrix_in_docs() -> dict[str, dict[str, str]]:
    """The "Clients in the wild" table of docs/relay.md: {MTA: {column: cell}}."""
    lines = (REPO_ROOT / "docs" / "relay.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("## Clients in the wild")
    header: list[str] = []
    table: dict[str, dict[str, str]] = {}
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            if table:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            table[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return table


def test_the_docs_show_the_measured_matrix() -> None:
    docs = matrix_in_docs()
    names = {"Postfix": "postfix", "Exim": "exim", "OpenSMTPD": "opensmtpd", "nullmailer": "nullmailer",
             "dma": "dma"}
    for row, name in names.items():
        row_key = next((k for k in docs if re.sub(r"\W.*", "", k) == row), None)
        assert row_key is not None, f"no row for {row} in docs/relay.md"
        assert docs[row_key] == {cell: REACTIONS[name][cell].text for cell in CELLS}, row
    msmtp_row = next(v for k, v in docs.items() if k.startswith("msmtp"))
    for cell, code in MSMTP_EXITS.items():
        assert f"exit {code}" in msmtp_row[cell], cell
