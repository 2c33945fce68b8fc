"""End-to-end: a user-written strategy, named by import path in the config, runs in the real ServerApp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli, processes_under

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_custom_strategy_example(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = cli(
        "run",
        str(ROOT / "examples/custom_strategy/config.toml"),
        "--out",
        str(out),
        "--insecure",
        timeout=540,
        env={"DMSC_FED_HOME": str(tmp_path)},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert summary["final_metrics"]["accuracy"] >= summary["centralized_baseline"]["accuracy"] - 0.05
    assert "ClippedFedAvg" in (out / "server.log").read_text()
    assert processes_under(tmp_path) == []
