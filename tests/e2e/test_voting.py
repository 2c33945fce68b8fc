"""End-to-end: a voting ensemble (every site's model kept, soft vote at evaluation) through real processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import processes_under, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CONFIG = """
name = "vote"
seed = 5
rounds = 2
local_epochs = 2
learning_rate = 0.1
[[sites]]
name = "a"
[[sites]]
name = "b"
[[sites]]
name = "c"
[dataset]
name = "breast_cancer"
partitioning = "dirichlet"
[model]
name = "logreg"
[strategy]
name = "vote"
options = { voting = "soft" }
"""


def test_soft_voting_ensemble(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    _res, out, summary = run_job(config, tmp_path, timeout=840)
    assert summary["rounds_completed"] == 2 and summary["rejected"] == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(sorted(r["evaluate_sites"]) == ["a", "b", "c"] for r in rows)
    assert "auc" in rows[-1]["evaluate"] and rows[-1]["evaluate"]["auc"] > 0.9
    assert summary["final_metrics"]["accuracy"] > 0.9
    from safetensors.numpy import load_file

    members = {k.split("/")[1] for k in load_file(str(out / "model.safetensors"))}
    assert members == {"a", "b", "c"}  # the final model is the ensemble of the three sites' models
    assert processes_under(tmp_path) == []
