import json
from pathlib import Path

from parley.common.events import EVENT_TYPES, schema

DOCS = Path(__file__).resolve().parents[3] / "docs" / "events.md"


def test_docs_events_md_is_generated_from_the_catalog() -> None:
    assert DOCS.read_text() == schema.markdown(), (
        "docs/events.md is stale: run `just docs` (parley events schema --markdown docs/events.md)"
    )


def test_json_schema_has_every_type() -> None:
    exported = json.dumps(schema.json_schema())
    for tag in EVENT_TYPES:
        assert f'"{tag}"' in exported


def test_docs_json_schema_is_generated_from_the_catalog() -> None:
    exported = json.loads((DOCS.parent / "events.schema.json").read_text())
    assert exported == schema.json_schema(), "docs/events.schema.json is stale: run `just docs`"
