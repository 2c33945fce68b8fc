"""End-to-end: business segmentation, two clinical tasks on one backbone, with DP and CKKS."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ROOT, processes_under, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_multitask_example(tmp_path: Path) -> None:
    _res, out, summary = run_job(ROOT / "examples/multitask/config.toml", tmp_path, timeout=840)
    assert summary["rounds_completed"] == 3 and summary["rejected"] == []
    seg = summary["segmentation"]
    sites = {s["name"]: s["sites"] for s in seg["segments"]}
    assert sites == {
        "backbone": ["hospital-a", "hospital-b", "hospital-c"],
        "diagnosis": ["hospital-a", "hospital-b"],
        "readmission": ["hospital-c"],
    }
    assert all(s["encrypted"] and s["dp"] for s in seg["segments"])
    tasks = seg["tasks"]
    assert tasks["diagnosis"]["sites"] == 2 and tasks["readmission"]["sites"] == 1
    # 0.800 / 0.762 measured (no DP: 0.822 / 0.756); always-negative readmission scores 0.713
    assert tasks["diagnosis"]["accuracy"] > 0.72 and tasks["readmission"]["accuracy"] > 0.72
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        assert 0 < summary["sites"][site]["epsilon"] <= 4.0 * 1.001
    assert (out / "model.pt").exists()
    assert processes_under(tmp_path) == []
