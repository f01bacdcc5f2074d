# Parley task runner. `just` lists the recipes.
set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes
default:
    @just --list

# Install every workspace member and the dev tools into .venv (from uv.lock)
setup:
    uv sync --all-packages --frozen

# Start NATS + Postgres under .parley/ and supervise every service (Ctrl-C stops all)
up *ARGS: setup
    uv run --frozen parley up {{ARGS}}

# Run the platform, play a call, show its recorded timeline, shut down
demo: setup
    uv run --frozen parley demo

# Run the test suite against real nats-server and Postgres (started by the fixtures)
test *ARGS: setup
    uv run --frozen pytest {{ARGS}}

# Lint (ruff) and type-check (mypy strict on libs/common)
lint: setup
    uv run --frozen ruff check .
    uv run --frozen mypy

# Benchmarks: median and p99 against the budgets; results in bench/results/
bench *ARGS: setup
    uv run --frozen python bench/run.py {{ARGS}}

# Regenerate docs/events.md and docs/events.schema.json from the event catalog
docs: setup
    uv run --frozen parley events schema --markdown docs/events.md --json docs/events.schema.json
