"""Leases: renewing the ones held, losing one that was taken, and a watch that stops promptly."""

import asyncio

import pytest
from nats.js.errors import KeyNotFoundError

from parley.common.bus import Bus
from parley.devkit.infra import NatsServer
from parley.media.ownership import Leases, LeaseState, instance_name


async def test_stop_returns_while_leases_keep_being_renewed(bus) -> None:
    # Renewals arrive every second per call; a stop landing as one arrives was swallowed by
    # the watcher's wait_for on Python 3.11, and media's shutdown then waited forever.
    writer = Leases(bus, "writer")
    revisions = {}
    for n in range(20):
        call = f"call-{n}"
        revisions[call] = await writer.claim(call, LeaseState(owner="writer", org_id="o1"))

    done = asyncio.Event()

    async def renew_forever() -> None:  # until told: a cancel could be swallowed here too
        while not done.is_set():
            for call, revision in revisions.items():
                revisions[call] = await writer.renew(
                    call, LeaseState(owner="writer", org_id="o1"), revision)

    renewing = asyncio.create_task(renew_forever())
    try:
        for _ in range(15):
            watcher = Leases(bus, "watcher")

            async def never(call_id: str, state: LeaseState, revision: int) -> None:
                raise AssertionError("no lease is silent here")

            await watcher.watch(never)
            await asyncio.sleep(0.05)
            await asyncio.wait_for(watcher.stop(), 2.0)
    finally:
        done.set()
        await asyncio.wait_for(renewing, 5.0)


async def test_held_leases_are_renewed_with_their_latest_state_until_let_go(bus) -> None:
    leases = Leases(bus, "me", renew_s=0.1)
    kv = await leases.kv()
    state = LeaseState(owner="me", org_id="o1")
    revisions = {call: await leases.claim(call, state) for call in ("call-a", "call-b")}
    turns = {"call-a": 0, "call-b": 0}
    lost: list[str] = []

    def state_of(call: str):
        def current() -> LeaseState:
            turns[call] += 1
            return LeaseState(owner="me", org_id="o1", turn_no=turns[call])
        return current

    try:
        for call, revision in revisions.items():
            await leases.hold(call, revision, state_of(call), lambda c=call: lost.append(c))
        await asyncio.sleep(0.65)
        revision = await leases.let_go("call-a")
        entry = await kv.get("call-a")
        assert revision == entry.revision and revision > revisions["call-a"]
        assert turns["call-a"] >= 4  # renewed every 0.1 s, not once
        assert b'"turn_no":%d' % turns["call-a"] in entry.value  # the state at the last renewal
        await asyncio.sleep(0.3)
        assert (await kv.get("call-a")).revision == revision  # let go: no more renewals
        assert (await kv.get("call-b")).revision > entry.revision  # the other one still renewed
        await leases.release("call-a", revision)  # the revision let_go gave is the bucket's
        with pytest.raises(KeyNotFoundError):
            await kv.get("call-a")
        assert lost == []
    finally:
        await leases.close()


async def test_a_lease_another_instance_took_is_lost_at_the_next_renewal(bus) -> None:
    mine = Leases(bus, "me", renew_s=0.1)
    kv = await mine.kv()
    revision = await mine.claim("call-c", LeaseState(owner="me", org_id="o1"))
    lost = asyncio.Event()
    try:
        await mine.hold("call-c", revision, lambda: LeaseState(owner="me", org_id="o1"), lost.set)
        await asyncio.sleep(0.25)
        current = (await kv.get("call-c")).revision
        await kv.update("call-c", b'{"owner":"other","org_id":"o1"}', last=current)
        await asyncio.wait_for(lost.wait(), 1.0)
        assert await mine.let_go("call-c") is None  # the hold ended with the loss
        await asyncio.sleep(0.25)
        assert b'"other"' in (await kv.get("call-c")).value  # and nothing overwrote the taker
    finally:
        await mine.close()


async def test_a_renewal_beaten_by_our_own_earlier_one_keeps_the_lease(bus) -> None:
    # A renewal unanswered for a period is sent again; if the first did land (its answer was
    # only late: a busy loop or server), the second's compare-and-set fails. The lease is
    # still ours: the hold goes on from the bucket's revision instead of dropping the call.
    mine = Leases(bus, "me", renew_s=0.1)
    kv = await mine.kv()
    revision = await mine.claim("call-e", LeaseState(owner="me", org_id="o1"))
    lost = asyncio.Event()
    try:
        await mine.hold("call-e", revision, lambda: LeaseState(owner="me", org_id="o1"), lost.set)
        for _ in range(3):  # "our" writes that the holder never heard about
            await asyncio.sleep(0.15)
            current = (await kv.get("call-e")).revision
            await kv.update("call-e", b'{"owner":"me","org_id":"o1","turn_no":7}', last=current)
        await asyncio.sleep(0.3)
        assert not lost.is_set()
        latest = await mine.let_go("call-e")
        assert latest == (await kv.get("call-e")).revision
        assert latest > current + 1  # renewed after the foreign-looking writes, too
    finally:
        await mine.close()


async def test_a_lease_let_go_and_handed_over_is_taken_at_once(bus) -> None:
    leaving = Leases(bus, "leaving", renew_s=0.1)
    staying = Leases(bus, "staying", renew_s=0.1, timeout_s=30.0)  # silence alone: never
    taken: asyncio.Queue[tuple[str, LeaseState, int]] = asyncio.Queue()

    async def take_over(call_id: str, state: LeaseState, revision: int) -> None:
        await taken.put((call_id, state, revision))

    state = LeaseState(owner="leaving", org_id="o1", turn_no=2, resume_seq=150)
    revision = await leaving.claim("call-d", state)
    await staying.watch(take_over)
    try:
        await leaving.hold("call-d", revision, lambda: state, lambda: None)
        await asyncio.sleep(0.35)  # renewed a few times meanwhile
        latest = await leaving.let_go("call-d")
        await leaving.release("call-d", latest, hand_over=state)
        call_id, previous, won = await asyncio.wait_for(taken.get(), 1.0)
        assert (call_id, previous.owner, previous.resume_seq) == ("call-d", "", 150)
        entry = await (await staying.kv()).get("call-d")
        assert entry.revision == won and b'"owner":"staying"' in entry.value
    finally:
        await staying.stop()
        await leaving.close()


async def test_a_restarted_instance_takes_back_the_calls_it_left(bus) -> None:
    """A media container restarted in its pod keeps its hostname and pid 1, so its instance
    name, or a fixed PARLEY_INSTANCE_ID, was the same as before: leases in its own name it
    took for its own and never took over, and with no other instance the calls stayed silent
    until the callers hung up. The lease owner's name is unique to each start now."""
    first = instance_name("media-0")
    died = Leases(bus, first, renew_s=0.1)
    revision = await died.claim("call-r", LeaseState(owner=first, org_id="o1", resume_seq=7))
    await died.close()  # killed: the lease is renewed no more
    restarted = Leases(bus, instance_name("media-0"), renew_s=0.1, timeout_s=0.3)
    taken: asyncio.Queue[tuple[str, LeaseState, int]] = asyncio.Queue()

    async def take_over(call_id: str, state: LeaseState, won: int) -> None:
        await taken.put((call_id, state, won))

    await restarted.watch(take_over)
    try:
        call_id, previous, won = await asyncio.wait_for(taken.get(), 3.0)
        assert (call_id, previous.owner, previous.resume_seq) == ("call-r", first, 7)
        assert won > revision
    finally:
        await restarted.stop()


async def test_a_call_left_while_no_instance_was_up_is_taken_by_the_next_to_start(bus) -> None:
    """Both media instances killed within a second, the next up 6 s later: the leases had
    expired (the bucket's TTL was 5 s) and a new instance's watch never saw them, so no one took
    the calls up and they stayed silent until the callers hung up."""
    died = Leases(bus, "media-a.1", renew_s=0.1)
    await died.claim("call-x", LeaseState(owner="media-a.1", org_id="o1", resume_seq=3))
    await died.close()
    await asyncio.sleep(6.0)  # no media instance up, past the old TTL
    started = Leases(bus, "media-b.1", renew_s=0.1, timeout_s=0.3)
    taken: asyncio.Queue[tuple[str, LeaseState, int]] = asyncio.Queue()

    async def take_over(call_id: str, state: LeaseState, won: int) -> None:
        await taken.put((call_id, state, won))

    await started.watch(take_over)
    try:
        call_id, previous, _ = await asyncio.wait_for(taken.get(), 3.0)
        assert (call_id, previous.owner, previous.resume_seq) == ("call-x", "media-a.1", 3)
    finally:
        await started.stop()


async def test_a_nats_restart_hands_no_live_instances_call_to_another(tmp_path) -> None:
    """nats-server killed and back 2 s later, with both media instances alive: the watcher
    counted its own time cut off from NATS as the lease's silence and, reconnected before the
    owner's next renewal landed, took a call its live owner was still serving (a chaos run)."""
    server = NatsServer(tmp_path / "nats").start()
    owner_bus = await Bus.connect(server.url, name="owner")
    watcher_bus = await Bus.connect(server.url, name="watcher")
    owner, watcher = Leases(owner_bus, "owner"), Leases(watcher_bus, "watcher")
    taken: list[str] = []

    async def take_over(call_id: str, state: LeaseState, won: int) -> None:
        taken.append(call_id)

    try:
        await owner_bus.ensure_streams()
        state = LeaseState(owner="owner", org_id="o1")
        revision = await owner.claim("call-n", state)
        await owner.hold("call-n", revision, lambda: state, lambda: taken.append("lost"))
        await watcher.watch(take_over)
        await asyncio.sleep(1.2)  # renewed and seen
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        await asyncio.sleep(2.0)
        server.start()  # same port, same store
        await asyncio.sleep(4.0)  # several renewal periods after both reconnected
        assert taken == []
    finally:
        await watcher.stop()
        await owner.close()
        await watcher_bus.close()
        await owner_bus.close()
        server.stop()


async def test_a_call_whose_instance_dies_after_a_nats_restart_is_taken_over(tmp_path) -> None:
    """The lease watch is an ordered consumer, kept in the server's memory: a restarted
    nats-server had forgotten it, and the watcher saw no lease change until nats-py's missed
    heartbeats made it ask for the consumer again, about 20 s later: an owner that died
    meanwhile had its call taken over by no one until then (the compare-and-set on the
    revision last seen failed), the caller hearing nothing."""
    server = NatsServer(tmp_path / "nats").start()
    owner_bus = await Bus.connect(server.url, name="owner")
    watcher_bus = await Bus.connect(server.url, name="watcher")
    owner = Leases(owner_bus, "owner", renew_s=0.2)
    watcher = Leases(watcher_bus, "watcher", timeout_s=0.6)
    taken: asyncio.Queue[str] = asyncio.Queue()

    async def take_over(call_id: str, state: LeaseState, won: int) -> None:
        await taken.put(call_id)

    try:
        await owner_bus.ensure_streams()
        state = LeaseState(owner="owner", org_id="o1")
        revision = await owner.claim("call-w", state)
        await owner.hold("call-w", revision, lambda: state, lambda: None)
        await watcher.watch(take_over)
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        server.start()  # same port, same store
        await asyncio.sleep(3.0)  # both back, the lease renewed meanwhile
        assert taken.empty()
        await owner.close()  # the owner dies: its lease is renewed no more
        assert await asyncio.wait_for(taken.get(), 5.0) == "call-w"
    finally:
        await watcher.stop()
        await owner.close()
        await watcher_bus.close()
        await owner_bus.close()
        server.stop()
