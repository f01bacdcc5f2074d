"""Migration 012: the callbacks booked before the gateway dialled them."""

import psycopg

from parley.common.store import apply_migrations

ORG = "org_1"
CALLER = "+14155550111"


def before_012(conn: psycopg.Connection) -> None:
    """Take the database back to where migration 012 finds it (011 applied)."""
    conn.execute("DROP INDEX tool_callbacks_outstanding")
    conn.execute("ALTER TABLE tool_callbacks DROP COLUMN status, DROP COLUMN attempts, "
                 "DROP COLUMN retry_at, DROP COLUMN placed_call_id, DROP COLUMN last_error, "
                 "DROP COLUMN updated_at")
    conn.execute("DELETE FROM schema_migrations WHERE version = 12")


async def test_callbacks_booked_before_dialling_began_are_not_all_dialled(
        database_url: str) -> None:
    # Before 012 nothing dialled tool_callbacks and schedule_callback booked any number the
    # model named, at any time. Those rows must not all turn pending on deploy: the gateway
    # would at once ring callers whose time passed long ago, and numbers a caller talked the
    # model into (premium-rate, foreign) that the guard now refuses; and of two callbacks
    # booked on one call to one number, only the first stands, as the guard has it now.
    with psycopg.connect(database_url, autocommit=True) as conn:
        before_012(conn)
        conn.execute(
            "INSERT INTO carrier_calls (carrier, carrier_call_id, call_id, org_id, agent_id, "
            "direction, from_number, to_number) VALUES ('twilio', 'CA1', 'call_in', %s, 'a', "
            "'inbound', %s, '+14155550100')", (ORG, CALLER))
        rows = {  # tool_call_id: (number, callback_at)
            "missed": (CALLER, "now() - interval '3 months'"),
            "premium": ("+882345678901", "now() + interval '1 day'"),
            "far": (CALLER, "now() + interval '70 years'"),
            "unknown_call": (CALLER, "now() + interval '1 day'"),
            "due": (CALLER, "now() + interval '1 day'"),
            "due_again": (CALLER, "now() + interval '2 days'"),  # booked after "due"
        }
        for tool_call_id, (number, at) in rows.items():
            call_id = "call_gone" if tool_call_id == "unknown_call" else "call_in"
            conn.execute(
                "INSERT INTO tool_callbacks (org_id, call_id, tool_call_id, agent_id, number, "
                f"callback_at) VALUES (%s, %s, %s, 'a', %s, {at})",
                (ORG, call_id, tool_call_id, number))

    assert await apply_migrations(database_url) == ["012_callback_dialling"]

    with psycopg.connect(database_url) as conn:
        statuses = dict(conn.execute(
            "SELECT tool_call_id, status FROM tool_callbacks").fetchall())
        errors = dict(conn.execute(
            "SELECT tool_call_id, last_error FROM tool_callbacks").fetchall())
    assert statuses == {"missed": "failed", "premium": "failed", "far": "failed",
                        "unknown_call": "failed", "due": "pending", "due_again": "failed"}
    assert errors["due"] == ""
    assert all(errors[key].startswith("booked before callbacks were dialled")
               for key in statuses if key != "due")
