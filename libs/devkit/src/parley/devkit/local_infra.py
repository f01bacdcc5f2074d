"""The development infrastructure under ``.parley/``: an embedded nats-server and Postgres.

``parley infra up`` leaves both servers running detached, for later commands; ``parley up`` starts
the missing ones for its own lifetime. What runs where is recorded in ``.parley/infra.json`` (pids
and ports; ports are kept after ``down`` and reused when free, so URLs stay stable across restarts)
and the URLs in ``.parley/env``: ``KEY=value`` lines that a shell (``set -a; . .parley/env``),
``docker --env-file`` and dotenv loaders all read.

A server whose URL variable (``PARLEY_NATS_URL`` / ``PARLEY_DATABASE_URL``) is set in the
environment is external: it is used as is, never started or stopped here. A variable holding the
URL recorded for the embedded server (a sourced ``.parley/env``) does not count as external.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from parley.devkit.infra import (
    InfraError,
    NatsServer,
    PostgresServer,
    pid_alive,
    port_open,
    stop_pid,
)

NATS_URL_VAR = "PARLEY_NATS_URL"
DATABASE_URL_VAR = "PARLEY_DATABASE_URL"
STATE_FILE_NAME = "infra.json"
ENV_FILE_NAME = "env"

Report = Callable[[str], None]
Server = NatsServer | PostgresServer
State = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class ServerKind:
    """What differs between the two servers."""

    name: str  # key in infra.json and directory under .parley/
    program: str  # process name: tells our server from an unrelated process that reused its pid
    url_var: str
    default_port: int  # for external URLs that name no port
    stop_signal: int
    stop_timeout: float


NATS = ServerKind("nats", "nats-server", NATS_URL_VAR, 4222, signal.SIGTERM, 10.0)
# SIGINT is Postgres' fast shutdown: roll back open transactions, checkpoint, exit.
POSTGRES = ServerKind("postgres", "postgres", DATABASE_URL_VAR, 5432, signal.SIGINT, 20.0)
SERVER_KINDS = (NATS, POSTGRES)

# Handles of servers left running after this process exits. Kept referenced and never waited on,
# so Python neither reaps nor reports them; the CLI exits right after and init adopts the servers.
_detached_handles: list[subprocess.Popen[bytes]] = []


@dataclass
class ServerStatus:
    """The state of one server as ``parley infra status`` reports it."""

    kind: ServerKind
    url: str | None
    pid: int | None
    up: bool
    external: bool

    def describe(self) -> str:
        """One aligned line: program, state, URL, pid."""
        state = "up" if self.up else "down"
        where = "external" if self.external else f"pid {self.pid or '-'}"
        return f"{self.kind.program:<12} {state:<5} {self.url or '-'}  ({where})"


@dataclass
class InfraSession:
    """The servers one command uses: their URLs, and the ones it started and still owns."""

    root: Path
    urls: dict[str, str] = field(default_factory=dict)
    started: list[tuple[ServerKind, Server]] = field(default_factory=list)

    def stop_started(self, report: Report) -> None:
        """Stop the servers this command started, and only those."""
        state = read_state(self.root)
        while self.started:
            kind, server = self.started.pop()
            pid = server.pid
            server.stop()
            report(f"{kind.program}: stopped (pid {pid})")
            record = state.get(kind.name, {})
            if record.get("pid") == pid:
                record["pid"] = None
        write_state(self.root, state)


def ensure_infra(root: Path, *, environ: Mapping[str, str], report: Report, detach: bool,
                 nats_port: int = 0, postgres_port: int = 0) -> InfraSession:
    """Start whichever embedded server is neither running nor external; write ``.parley/env``.

    With ``detach`` the servers started here outlive this process (``parley infra up``); without
    it the returned session owns them and must ``stop_started`` them (``parley up``).
    """
    root = root.absolute()  # postgres runs in its data dir: relative paths would break
    root.mkdir(parents=True, exist_ok=True)
    state = read_state(root)
    session = InfraSession(root)
    requested_ports = {NATS.name: nats_port, POSTGRES.name: postgres_port}
    try:
        for kind in SERVER_KINDS:
            external = external_url(kind, environ, state)
            if external is not None:
                report(f"{kind.program}: not started, using {external} ({kind.url_var} is set)")
                session.urls[kind.url_var] = external
                continue
            record = state.setdefault(kind.name, {})
            requested = requested_ports[kind.name]
            if _running(kind, record):
                report(f"{kind.program}: already running (pid {record['pid']}) at {record['url']}")
                if requested and requested != record["port"]:
                    report(f"{kind.program}: port {requested} ignored; `parley infra down` first")
            else:
                server = _start(kind, root, record, requested)
                record.update(pid=server.pid, port=server.port, url=server.url)
                if isinstance(server, NatsServer):
                    record["monitor_port"] = server.monitor_port
                write_state(root, state)
                report(f"{kind.program}: started (pid {server.pid}) at {server.url}")
                if detach and server.proc is not None:
                    _detached_handles.append(server.proc)
                    server.proc = None
                else:
                    session.started.append((kind, server))
            session.urls[kind.url_var] = record["url"]
    except BaseException:
        session.stop_started(report)
        raise
    write_env_file(root, session.urls)
    return session


def stop_infra(root: Path, report: Report) -> None:
    """Stop the embedded servers recorded under ``root``; keep their ports for the next start."""
    state = read_state(root)
    for kind in SERVER_KINDS:
        pid = state.get(kind.name, {}).get("pid")
        if not pid:
            report(f"{kind.program}: not running")
            continue
        if _is_our_process(pid, kind.program):
            stop_pid(pid, sig=kind.stop_signal, timeout=kind.stop_timeout)
            report(f"{kind.program}: stopped (pid {pid})")
        else:
            report(f"{kind.program}: was not running (stale pid {pid} forgotten)")
        state[kind.name]["pid"] = None
    write_state(root, state)


def infra_status(root: Path, environ: Mapping[str, str]) -> list[ServerStatus]:
    """The state of each server: external ones are probed by URL, embedded ones by pid and port."""
    state = read_state(root)
    statuses = []
    for kind in SERVER_KINDS:
        external = external_url(kind, environ, state)
        if external is not None:
            up = _reachable(external, kind.default_port)
            statuses.append(ServerStatus(kind, external, None, up, external=True))
            continue
        record = state.get(kind.name, {})
        up = _running(kind, record)
        statuses.append(ServerStatus(kind, record.get("url"), record.get("pid") if up else None, up,
                                     external=False))
    return statuses


def external_url(kind: ServerKind, environ: Mapping[str, str], state: State) -> str | None:
    """The external server's URL from the environment, or None when the embedded one is used."""
    url = environ.get(kind.url_var)
    if not url or url == state.get(kind.name, {}).get("url"):
        return None
    return url


def read_state(root: Path) -> State:
    """The contents of ``infra.json`` (empty when there is none yet)."""
    path = root / STATE_FILE_NAME
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        message = f"{path} is not valid JSON ({error}); stop the servers and delete it"
        raise InfraError(message) from error
    return state if isinstance(state, dict) else {}


def write_state(root: Path, state: State) -> None:
    """Replace ``infra.json`` atomically, so a concurrent reader never sees half a file."""
    path = root / STATE_FILE_NAME
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    partial.replace(path)


def format_env(urls: Mapping[str, str]) -> str:
    """``KEY=value`` lines, one per URL variable."""
    return "".join(f"{name}={value}\n" for name, value in urls.items())


def write_env_file(root: Path, urls: Mapping[str, str]) -> Path:
    """Write ``.parley/env`` and return its path."""
    path = root / ENV_FILE_NAME
    path.write_text(format_env(urls))
    return path


def read_env_file(root: Path) -> dict[str, str]:
    """The variables in ``.parley/env`` (empty when there is none)."""
    path = root / ENV_FILE_NAME
    if not path.exists():
        return {}
    lines = (line.strip() for line in path.read_text().splitlines())
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def _start(kind: ServerKind, root: Path, record: Mapping[str, Any], requested_port: int) -> Server:
    if requested_port and not _port_free(requested_port):
        raise InfraError(f"{kind.program}: port {requested_port} is already in use")
    port = requested_port or _reusable(record.get("port"))
    server: Server
    if kind is NATS:
        server = NatsServer(root / kind.name, port=port,
                            monitor_port=_reusable(record.get("monitor_port")))
    else:
        server = PostgresServer(root / kind.name, port=port)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


def _reusable(port: int | None) -> int:
    """The previously used port when it is still free, else 0 (any free port)."""
    return port if port and _port_free(port) else 0


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as the servers set it: a port held only by TIME_WAIT connections counts as free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _running(kind: ServerKind, record: Mapping[str, Any]) -> bool:
    pid, port = record.get("pid"), record.get("port")
    return bool(pid and port) and _is_our_process(pid, kind.program) and port_open(port)


def _is_our_process(pid: int, program: str) -> bool:
    if not pid_alive(pid):
        return False
    with contextlib.suppress(OSError):
        return program.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    return True  # no /proc (macOS): trust the recorded pid


def _reachable(url: str, default_port: int) -> bool:
    """True when any server in a (possibly comma-separated) URL list accepts TCP connections."""
    for one_url in url.split(","):
        parts = urlsplit(one_url.strip() if "//" in one_url else f"//{one_url.strip()}")
        with contextlib.suppress(ValueError):  # a malformed port counts as unreachable
            if port_open(parts.port or default_port, parts.hostname or "127.0.0.1"):
                return True
    return False

