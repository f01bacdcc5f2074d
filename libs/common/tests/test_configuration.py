import msgspec
import psycopg
import pytest

from parley.common import events as ev
from parley.common.bus import Bus
from parley.common.configuration import (
    AgentSettings,
    ConfigurationError,
    OutboxRelay,
    assign_number,
    create_agent,
    create_api_key,
    create_org,
    find_number,
    list_agents,
    revoke_api_key,
    update_agent,
    verify_api_key,
)
from parley.common.store.migrations import migration_files


@pytest.fixture
async def conn(database_url: str):
    async with await psycopg.AsyncConnection.connect(database_url) as connection:
        yield connection


async def outbox_events(conn) -> list[ev.Event]:
    cursor = await conn.execute("SELECT payload FROM outbox ORDER BY id")
    return [ev.decode(bytes(row[0])) for row in await cursor.fetchall()]


async def test_each_change_commits_with_its_config_event(conn) -> None:
    await create_org(conn, "acme", "Acme Dental", actor="cli")
    agent = await create_agent(conn, "acme", "Reception",
                               AgentSettings(prompt="Be kind.", pipeline="managed"),
                               agent_id="reception")
    await assign_number(conn, "acme", "+1 (415) 555-0100", agent.agent_id)
    await update_agent(conn, "acme", "reception", {"max_duration_s": 600})
    types = [e.type for e in await outbox_events(conn)]
    assert types == ["org.created", "agent.created", "number.assigned", "agent.updated"]
    routed = await find_number(conn, "+14155550100")
    assert routed is not None and (routed.org_id, routed.agent_id) == ("acme", "reception")
    (stored,) = await list_agents(conn, "acme")
    assert stored.settings.max_duration_s == 600 and stored.settings.pipeline == "managed"


async def test_a_failed_change_leaves_no_event(conn) -> None:
    await create_org(conn, "acme", "Acme")
    with pytest.raises(ConfigurationError, match="already exists"):
        await create_org(conn, "acme", "Again")
    with pytest.raises(ConfigurationError, match="not a phone number|not a possible"):
        await assign_number(conn, "acme", "12", "nobody")
    with pytest.raises(ConfigurationError, match="invalid agent settings"):
        await create_agent(conn, "acme", "A", agent_id="a1")
        await update_agent(conn, "acme", "a1", {"max_duration_s": -5})
    assert [e.type for e in await outbox_events(conn)] == ["org.created", "agent.created"]


async def test_numbers_and_agents_never_cross_tenants(conn) -> None:
    await create_org(conn, "one", "One")
    await create_org(conn, "two", "Two")
    await create_agent(conn, "one", "A", agent_id="a-one")
    await create_agent(conn, "two", "B", agent_id="a-two")
    await assign_number(conn, "one", "+14155550100", "a-one")
    with pytest.raises(ConfigurationError, match="another org"):
        await assign_number(conn, "two", "+14155550100", "a-two")
    with pytest.raises(ConfigurationError, match="not found in org"):
        await assign_number(conn, "two", "+14155550101", "a-one")
    with pytest.raises(ConfigurationError, match="not found in org"):
        await update_agent(conn, "two", "a-one", {"greeting": "hi"})


async def test_api_keys_are_hashed_verified_and_revocable(conn) -> None:
    await create_org(conn, "acme", "Acme")
    key, token = await create_api_key(conn, "acme", name="ci")
    cursor = await conn.execute("SELECT secret_hash FROM api_keys")
    assert token.split("_", 2)[2].encode() not in bytes((await cursor.fetchone())[0])
    verified = await verify_api_key(conn, token)
    assert verified is not None and verified.org_id == "acme" and verified.key_id == key.key_id
    assert await verify_api_key(conn, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert await verify_api_key(conn, "garbage") is None
    await revoke_api_key(conn, "acme", key.key_id)
    assert await verify_api_key(conn, token) is None
    # what no key holds, and Postgres cannot take: a header's undecodable bytes, a NUL
    assert await verify_api_key(conn, f"pk_{key.key_id}\udcff_secret") is None
    assert await verify_api_key(conn, "pk_\udcff\udcfe_secret") is None
    assert await verify_api_key(conn, "pk_a\x00b_secret") is None
    events = await outbox_events(conn)
    assert token not in str(events)  # the secret is never in an event


async def test_keys_issued_with_the_old_default_scopes_keep_the_knowledge_api(conn) -> None:
    await create_org(conn, "acme", "Acme")
    default, _ = await create_api_key(conn, "acme")
    assert {"knowledge:read", "knowledge:write"} <= set(default.scopes)
    old, old_token = await create_api_key(conn, "acme", scopes=["calls:write", "calls:read"])
    narrow, narrow_token = await create_api_key(conn, "acme", scopes=["calls:read"])
    [upgrade] = [sql for _, name, sql in migration_files() if name == "knowledge_scopes"]
    await conn.execute(upgrade)
    assert (await verify_api_key(conn, old_token)).scopes == [
        "calls:write", "calls:read", "knowledge:read", "knowledge:write"]
    assert (await verify_api_key(conn, narrow_token)).scopes == ["calls:read"]


async def test_outbox_relay_publishes_in_order_once(conn, bus: Bus) -> None:
    await create_org(conn, "acme", "Acme")
    await create_agent(conn, "acme", "A", agent_id="a1")
    relay = OutboxRelay(bus, conn)
    assert await relay.publish_pending() == 2
    assert await relay.publish_pending() == 0
    replayed = [e async for _, e in bus.replay("parley.ev.acme.>")]
    assert [e.type for e in replayed] == ["org.created", "agent.created"]
    assert [e.id for e in replayed] == [e.id for e in await outbox_events(conn)]


async def test_an_id_with_a_trailing_newline_is_refused(conn) -> None:
    with pytest.raises(ConfigurationError):
        await create_org(conn, "evil\n", "Evil")


async def test_an_unpublishable_outbox_row_is_set_aside_and_the_rest_published(
        conn, bus: Bus) -> None:
    # A row stored before ids were checked as they are now (or corrupted): NATS refuses its
    # subject every time. It used to roll back every batch, so no config event left again.
    await create_org(conn, "before", "Before")
    bad = ev.OrgCreated(org_id="before", name="Evil")
    payload = ev.encode(bad).replace(b'"org_id":"before"', b'"org_id":"evil\\n"')
    await conn.execute("INSERT INTO outbox (event_id, payload) VALUES (%s, %s)", (bad.id, payload))
    await create_org(conn, "after", "After")
    await conn.commit()
    relay = OutboxRelay(bus, conn)
    assert await relay.publish_pending() == 2
    assert await relay.publish_pending() == 0
    replayed = [e.org_id async for _, e in bus.replay("parley.ev.>")]
    assert replayed == ["before", "after"]
    cursor = await conn.execute("SELECT failure FROM outbox WHERE failed_at IS NOT NULL")
    ((failure,),) = await cursor.fetchall()
    assert "org_id" in failure


def test_an_agent_gets_the_common_backchannels_by_default() -> None:
    # Hesitations and acknowledgements ("hmm", "got it") are the caller listening: an agent
    # configured with nothing must not be interrupted by them.
    settings = msgspec.json.decode(b"{}", type=AgentSettings)
    assert settings.backchannels == AgentSettings().backchannels
    assert {"uh-huh", "mm-hmm", "okay", "yeah", "hmm", "mm", "got it", "i see"} <= set(
        settings.backchannels)


async def test_transfer_numbers_are_e164_and_none_by_default(conn) -> None:
    await create_org(conn, "acme", "Acme")
    agent = await create_agent(conn, "acme", "Reception", agent_id="reception")
    assert agent.settings.transfer_numbers == []  # the agent may not transfer
    updated = await update_agent(conn, "acme", "reception",
                                 {"transfer_numbers": ["+14155550123"]})
    assert updated.settings.transfer_numbers == ["+14155550123"]
    for bad in ("4155550123", "+1 415 555 0123", "+14155550123\n", "+0123456789"):
        with pytest.raises(ConfigurationError, match="transfer_numbers"):
            await update_agent(conn, "acme", "reception", {"transfer_numbers": [bad]})


@pytest.mark.parametrize("field", ["idle_prompt", "idle_goodbye"])
@pytest.mark.parametrize("words", ["", "   ", "\n\t"])
def test_idle_words_must_be_words(field: str, words: str) -> None:
    """Spaces alone would be said as nothing: a silent goodbye, then the hang-up."""
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.convert({field: words}, AgentSettings)
    assert getattr(msgspec.convert({field: " Hola? "}, AgentSettings), field) == " Hola? "
