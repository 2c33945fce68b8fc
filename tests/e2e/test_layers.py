"""End-to-end: layer segmentation, two stages on two site groups, one stage encrypted, one by median."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ROOT, processes_under, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_layer_mode_example(tmp_path: Path) -> None:
    _res, out, summary = run_job(ROOT / "examples/layers/config.toml", tmp_path, timeout=840)
    assert summary["rounds_completed"] == 3 and summary["rejected"] == []
    seg = summary["segmentation"]
    stages = {s["name"]: s for s in seg["segments"]}
    assert stages["stage-0"]["sites"] == ["gpu-a", "cpu-a"] and stages["stage-1"]["sites"] == ["cpu-b"]
    assert stages["stage-0"]["encrypted"] and not stages["stage-1"]["encrypted"]
    assert stages["stage-1"]["rule"] == "median"
    assert stages["stage-0"]["values"] + stages["stage-1"]["values"] == 30 * 64 + 64 + 64 * 32 + 32 + 32 * 2 + 2
    assert (out / "model.pt").exists()
    assert summary["final_metrics"]["accuracy"] > 0.8
    assert processes_under(tmp_path) == []
