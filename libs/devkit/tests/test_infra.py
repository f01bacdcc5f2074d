"""The embedded servers as started by ``parley up``, the test plugin and the benchmarks."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from parley.devkit.infra import NatsServer


def gomaxprocs(server: NatsServer) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/varz", timeout=5) as r:
        return int(json.load(r)["gomaxprocs"])


@pytest.mark.parametrize(("setting", "expected"), [(None, 1), ("2", 2)])
def test_the_embedded_nats_server_runs_on_one_go_proc_unless_told_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None,
        expected: int) -> None:
    if setting is None:
        monkeypatch.delenv("GOMAXPROCS", raising=False)
    else:
        monkeypatch.setenv("GOMAXPROCS", setting)
    server = NatsServer(tmp_path).start()
    try:
        assert gomaxprocs(server) == expected
    finally:
        server.stop()
