import pytest

from parley.common.configuration import update_agent
from parley.common.tools.builtin_specs import BUILTIN_SPECS
from parley.common.tools.definitions import ToolDefinitionError, argument_errors
from parley.common.tools.repository import (
    add_tool,
    agent_tool_specs,
    delete_tool,
    get_secrets,
    get_tool,
    list_tools,
    set_secret,
)

from .conftest import AGENT, ORG, OTHER_AGENT, OTHER_ORG

WITHOUT_TRANSFER = [name for name in BUILTIN_SPECS if name != "transfer_call"]

CRM = {"name": "crm_lookup", "description": "Find a customer in the CRM.",
       "url": "https://crm.example.com/customers/{phone}", "method": "GET",
       "parameters": {"type": "object", "required": ["phone"],
                      "properties": {"phone": {"type": "string"}}},
       "headers": {"Authorization": "Bearer {secret:crm_token}"}, "sensitive": True}


async def test_add_get_list_and_offer_tools(pool, orgs):
    async with pool.connection() as conn:
        tool = await add_tool(conn, ORG, AGENT, CRM)
        assert tool.secret_names() == {"crm_token"}
        assert await get_tool(conn, ORG, AGENT, "crm_lookup") == tool
        assert await get_tool(conn, OTHER_ORG, AGENT, "crm_lookup") is None
        assert await list_tools(conn, ORG, AGENT) == [tool]

        specs = await agent_tool_specs(conn, ORG, AGENT)
        assert [s.name for s in specs] == [*WITHOUT_TRANSFER, "crm_lookup"]
        assert specs[-1].parameters == CRM["parameters"] and specs[-1].sensitive
        only = await agent_tool_specs(conn, ORG, AGENT, builtins=["end_call"])
        assert [s.name for s in only] == ["end_call", "crm_lookup"]
        assert [s.name for s in await agent_tool_specs(conn, OTHER_ORG, OTHER_AGENT)] == [
            *WITHOUT_TRANSFER]

        with pytest.raises(ToolDefinitionError, match="already has"):
            await add_tool(conn, ORG, AGENT, CRM)
        await add_tool(conn, ORG, AGENT, {**CRM, "description": "v2"}, replace=True)
        assert (await get_tool(conn, ORG, AGENT, "crm_lookup")).description == "v2"
        assert await delete_tool(conn, ORG, AGENT, "crm_lookup")
        assert await list_tools(conn, ORG, AGENT) == []


async def test_transfer_call_is_offered_only_pinned_to_the_agents_transfer_numbers(pool, orgs):
    async with pool.connection() as conn:
        assert "transfer_call" not in [s.name for s in await agent_tool_specs(conn, ORG, AGENT)]
        await update_agent(conn, ORG, AGENT,
                           {"transfer_numbers": ["+14155550123", "+14155550124"]})
        specs = {s.name: s for s in await agent_tool_specs(conn, ORG, AGENT)}
        assert list(specs) == list(BUILTIN_SPECS)
        transfer = specs["transfer_call"].parameters
        assert transfer["properties"]["to"]["enum"] == ["+14155550123", "+14155550124"]
        assert argument_errors(transfer, {"to": "+882345678901"})
        assert not argument_errors(transfer, {"to": "+14155550124"})
        assert "transfer_call" not in [  # another org's agent is not affected
            s.name for s in await agent_tool_specs(conn, OTHER_ORG, OTHER_AGENT)]


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "end_call"}, "built-in"),
    ({"name": "has space"}, "invalid tool definition"),
    ({"name": "crm_lookup\n"}, "invalid tool definition"),  # $ would match before the newline
    ({"url": "ftp://x"}, "http"),
    ({"parameters": {"type": "array"}}, '"type": "object"'),
    ({"parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}, "schema"),
    ({"parameters": {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}},
     "'#/\\$defs/missing' does not resolve"),
    ({"parameters": {"type": "object", "properties": {"x": {"$ref": "https://example.com/s"}}}},
     "remote references are not fetched"),
    ({"timeout_s": 0}, "invalid tool definition"),
    ({"retry": {"attempts": 0}}, "invalid tool definition"),
    ({"surprise": 1}, "invalid tool definition"),
    # Header templates no request could carry: refused here, not failed at every call.
    ({"headers": {"X Api Key": "k"}}, "invalid header name"),
    ({"headers": {"X-Key\n": "k"}}, "invalid header name"),
    ({"headers": {"X-Key": "line\nbreak"}}, "control characters"),
    ({"headers": {"Authorization": "a", "authorization": "b"}}, "given twice"),
])
async def test_bad_definitions_are_refused(pool, orgs, change, message):
    async with pool.connection() as conn:
        with pytest.raises(ToolDefinitionError, match=message):
            await add_tool(conn, ORG, AGENT, {**CRM, **change})


async def test_refs_within_the_schema_are_accepted(pool, orgs):
    parameters = {"type": "object", "$defs": {"day": {"enum": ["mon", "tue"]}},
                  "properties": {"day": {"$ref": "#/$defs/day"},
                                 "slots": {"type": "array", "items": {"$ref": "#/$defs/day"}}}}
    async with pool.connection() as conn:
        tool = await add_tool(conn, ORG, AGENT, {**CRM, "parameters": parameters})
    assert argument_errors(tool.parameters, {"day": "mon", "slots": ["tue"]}) == []
    assert argument_errors(tool.parameters, {"day": "sun"}) == [
        "day: 'sun' is not one of ['mon', 'tue']"]


async def test_a_tool_needs_an_agent_of_the_org(pool, orgs):
    async with pool.connection() as conn:
        with pytest.raises(ToolDefinitionError, match="not found in org"):
            await add_tool(conn, ORG, OTHER_AGENT, CRM)


async def test_secrets_are_per_org(pool, orgs):
    async with pool.connection() as conn:
        await set_secret(conn, ORG, "crm_token", "one")
        await set_secret(conn, ORG, "crm_token", "two")
        assert await get_secrets(conn, ORG, ["crm_token", "other"]) == {"crm_token": "two"}
        assert await get_secrets(conn, OTHER_ORG, ["crm_token"]) == {}


@pytest.mark.parametrize(("name", "arguments"), [
    ("transfer_call", {"to": "+14155550123\n"}),
    ("schedule_callback", {"when": "2030-01-01T10:00:00+00:00", "number": "+14155550123\n"}),
    ("send_dtmf", {"digits": "123#\n"}),
])
def test_builtin_arguments_ending_in_a_newline_are_refused(name, arguments):
    assert argument_errors(BUILTIN_SPECS[name].parameters, arguments)  # $ matches before "\n"
    assert not argument_errors(BUILTIN_SPECS[name].parameters,
                               {key: value.rstrip("\n") for key, value in arguments.items()})
