# Parley task runner. `just` lists the recipes.
set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes
default:
    @just --list

# Install every workspace member and the dev tools into .venv (from uv.lock), compiled to
# bytecode once: with PYTHONDONTWRITEBYTECODE set (as on our CI machines) Python never caches
# it, and every process compiled its ~1,000 modules as it started (importing media, gateway
# and brain: 7.9 s on a slow VM, 4.1 s from bytecode).
setup:
    uv sync --all-packages --frozen --compile-bytecode

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
