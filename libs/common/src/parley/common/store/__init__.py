"""The Postgres event store: migrations, the events table, checkpoints and projections."""

from .event_store import (
    DeadLetter,
    EventStore,
    StoredEvent,
    append,
    event_row,
    get_checkpoint,
    set_checkpoint,
)
from .migrations import apply_migrations, migration_files
from .projections import (
    WRITE_LOCK,
    Projection,
    RebuildReport,
    catch_up,
    installed_projections,
    rebuild,
)

__all__ = [
    "WRITE_LOCK", "DeadLetter", "EventStore", "Projection", "RebuildReport", "StoredEvent",
    "append", "apply_migrations", "catch_up", "event_row", "get_checkpoint",
    "installed_projections", "migration_files", "rebuild", "set_checkpoint",
]
