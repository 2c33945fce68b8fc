"""End-to-end: a user-written strategy, named by import path in the config, runs in the real ServerApp."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ROOT, processes_under, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_custom_strategy_example(tmp_path: Path) -> None:
    _res, out, summary = run_job(ROOT / "examples/custom_strategy/config.toml", tmp_path, "--insecure", timeout=540)
    assert summary["rounds_completed"] == 3
    assert summary["final_metrics"]["accuracy"] >= summary["centralized_baseline"]["accuracy"] - 0.05
    assert "ClippedFedAvg" in (out / "server.log").read_text()
    assert processes_under(tmp_path) == []
