"""bench/peers.py's own pieces that need no peer installed: the stamp connector ours is timed
with in the pickup comparison, and the one-line skip when a peer is missing."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from bench import peers
from connectors.manager import Plugins
from connectors.testing import make_connector, make_job, run_job


@pytest.fixture
def stamp_dir(tmp_path: Path) -> Iterator[Path]:
    peers.write_stamp_plugin(tmp_path)
    yield tmp_path
    sys.modules.pop("emp_bench_stamp", None)  # the plugin loader refuses a name already loaded


def test_the_stamp_plugin_loads_from_a_plugins_directory(stamp_dir: Path) -> None:
    installed = {c.name: c for c in Plugins(plugins_dir=stamp_dir).installed()}
    assert "stamp" in installed
    assert "stamp" in installed["stamp"].services


async def test_the_stamp_connector_returns_when_its_run_began() -> None:
    before = time.time()
    result, _ctx = await run_job(make_connector(peers.StampConnector), make_job("stamp", {}))
    assert before <= result["started"] <= time.time()


def test_missing_peers_are_skipped_with_the_install_line(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    def load(peer: str) -> ModuleType | None:
        return None if peer == "saq" else sys

    monkeypatch.setattr(peers, "load", load)
    assert peers.available() == ["bullmq"]
    assert capsys.readouterr().out == "[peers] saq not installed, skipped: pip install bullmq saq\n"
    monkeypatch.setattr(peers, "load", lambda peer: None)
    assert asyncio.run(peers.run("redis://127.0.0.1:1/0", 1, 1)) == []  # no Redis is touched
    assert "bullmq, saq not installed" in capsys.readouterr().out
