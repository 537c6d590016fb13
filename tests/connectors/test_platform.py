"""The plugin API's pure parts, through the test kit: per-slot engine URLs, connector settings
errors, the job context's bounds, and the simulation connector run without Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from connectors import ConfigError, EngineSettings, JobCancelled, PermanentJobError, StopReason, slot_url
from connectors.simulation import SimulationConnector
from connectors.testing import FakeJobContext, make_connector, make_job, run_job


@pytest.mark.parametrize(("base", "slot", "step", "urls", "expected"), [
    ("http://127.0.0.1:8188", 0, 1, "", "http://127.0.0.1:8188"),
    ("http://127.0.0.1:8188", 3, 1, "", "http://127.0.0.1:8191"),
    ("http://127.0.0.1:8188", 2, 10, "", "http://127.0.0.1:8208"),
    ("http://127.0.0.1:8188", 5, 0, "", "http://127.0.0.1:8188"),  # step 0: every slot the same engine
    ("http://user:pw@gpu-box:7860/api", 1, 1, "", "http://user:pw@gpu-box:7861/api"),
    ("https://engine.example", 1, 1, "", "https://engine.example:444"),
    ("http://engine.example", 0, 1, "", "http://engine.example"),
    ("http://ignored:1", 1, 1, "http://a:1, http://b:2", "http://b:2"),
])
def test_slot_url(base: str, slot: int, step: int, urls: str, expected: str) -> None:
    assert slot_url(base, slot, port_step=step, urls=urls) == expected


def test_a_slot_beyond_the_url_list_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="slot 2 has no engine URL"):
        slot_url("", 2, urls="http://a:1,http://b:2")


class DemoSettings(EngineSettings):
    timeout_s: float = Field(30.0, gt=0)


def test_connector_settings_read_their_prefix_and_fail_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMP_DEMO_URL", "http://10.0.0.5:9000")
    monkeypatch.setenv("EMP_DEMO_PORT_STEP", "2")
    settings = DemoSettings.load("EMP_DEMO_")
    assert settings.url_for(0) == "http://10.0.0.5:9000" and settings.url_for(1) == "http://10.0.0.5:9002"
    monkeypatch.setenv("EMP_DEMO_TIMEOUT_S", "-1")
    with pytest.raises(ConfigError) as caught:
        DemoSettings.load("EMP_DEMO_")
    assert str(caught.value).startswith("EMP_DEMO_TIMEOUT_S='-1': ") and "\n" not in str(caught.value)
    monkeypatch.setenv("EMP_DEMO_TIMEOUT_S", "5")
    monkeypatch.setenv("EMP_DEMO_URL", "ftp://user:secret@x")
    with pytest.raises(ConfigError) as caught:
        DemoSettings.load("EMP_DEMO_")
    assert "EMP_DEMO_URL=" in str(caught.value) and "secret" not in str(caught.value)


def test_the_context_bounds_progress_and_outputs(tmp_path: Path) -> None:
    ctx = FakeJobContext(make_job("simulation"))
    ctx.progress(150, "x" * 5000, data={"big": "y" * 5000}, preview=b"jpeg", eta_s=-3)
    update = ctx.updates[-1]
    assert update.progress == 100 and len(update.message) == 1000
    assert update.data is None and update.preview is None and update.eta_s is None  # previews off
    with_previews = FakeJobContext(make_job("simulation"), previews=True)
    with_previews.progress(5, data={"node": "3"}, preview=b"jpeg", eta_s=2)
    assert with_previews.updates[-1].data == {"node": "3"} and with_previews.updates[-1].preview == b"jpeg"
    for bad in ("../etc/passwd", "", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="output name"):
            ctx.add_output(bad, b"x")
    with pytest.raises(ValueError, match="either as data or as a path"):
        ctx.add_output("a.bin")
    with pytest.raises(ValueError, match="is not a file"):
        ctx.add_output("a.bin", path=tmp_path / "missing")
    assert ctx.add_output("ok.png", b"png", content_type="image/png").size_bytes == 3


async def test_the_simulation_connector_through_the_kit() -> None:
    connector = make_connector(SimulationConnector, env={"EMP_SIM_STEPS": "4", "EMP_SIM_DURATION_S": "0"})
    result, ctx = await run_job(connector, make_job("simulation", {"seed": 1}))
    assert result["steps"] == 4 and [u.current_step for u in ctx.updates] == [1, 2, 3, 4]
    with pytest.raises(PermanentJobError, match="invalid simulation payload: steps"):
        await run_job(connector, make_job("simulation", {"steps": -1}))


async def test_the_kit_cancels_like_the_worker() -> None:
    connector = make_connector(SimulationConnector)
    job = make_job("simulation", {"duration_s": 30, "steps": 3000})
    ctx = FakeJobContext(job)
    with pytest.raises(JobCancelled, match="cancelled"):
        await run_job(connector, job, ctx, cancel_after=lambda c: len(c.updates) >= 2)
    assert ctx.stop_reason is StopReason.CANCELLED and 2 <= len(ctx.updates) < 3000
