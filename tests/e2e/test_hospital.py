"""The main job: the hospital example as shipped, through `dmsc-fed run`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ROOT, processes_under, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_hospital_example_with_dp_and_he(tmp_path: Path) -> None:
    res, _out, summary = run_job(ROOT / "examples/hospital/config.toml", tmp_path, timeout=840)
    assert summary["rounds_completed"] == summary["rounds_planned"]
    assert set(summary["sites"]) == {"st-mary", "general", "childrens"}
    fed, central = summary["final_metrics"]["accuracy"], summary["centralized_baseline"]["accuracy"]
    assert fed >= central - 0.03, (fed, central)
    for name, site in summary["sites"].items():
        assert 0 < site["epsilon"] <= 3.0 + 1e-6, name
        assert site["delta"] == 1e-5
    assert summary["privacy"]["he_params"]["scheme"] == "CKKS"
    assert "epsilon" in res.stdout and "centralized" in res.stdout
    assert processes_under(tmp_path) == []
