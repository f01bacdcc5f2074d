"""Leases: watching the bucket stops promptly, however busy the bucket is."""

import asyncio

from parley.media.ownership import Leases, LeaseState


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
