"""End-to-end: `dmsc-fed run` starts a real SuperLink and real SuperNodes on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmsc_fed.config import load_config
from dmsc_fed.training import model_for
from tests.helpers import cli, processes_under

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CONFIG = """
name = "e2e"
seed = 11
rounds = 2
local_epochs = 2
batch_size = 16
learning_rate = 0.05
momentum = 0.9

[[sites]]
name = "north"
[[sites]]
name = "south"
[[sites]]
name = "strict"
policy = "strict-policy.toml"

[dataset]
name = "breast_cancer"
partitioning = "dirichlet"
alpha = 1.0

[model]
name = "mlp"
hidden = [8]

[strategy]
min_sites = 2

[privacy]
dp = "on"
target_epsilon = 4.0
delta = 1e-5
encryption = "ckks"
"""


def test_two_round_private_run_over_tls_with_supernode_auth(tmp_path: Path) -> None:
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(CONFIG)
    (tmp_path / "strict-policy.toml").write_text("max_epsilon = 1.0\nrequire_encryption = true\n")
    out = tmp_path / "run"
    res = cli("run", str(cfg_path), "--out", str(out), timeout=540, env={"DMSC_FED_HOME": str(tmp_path)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "round   2/2" in res.stdout and "centralized" in res.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["secure_transport"] is True
    assert set(summary["sites"]) == {"north", "south"}
    assert "exceeds the site's maximum 1" in summary["refused_at_join"]["strict"]
    for site in summary["sites"].values():
        assert 0 < site["epsilon"] <= 4.0 and site["delta"] == 1e-5
    assert summary["privacy"]["encryption"] == "ckks" and summary["privacy"]["signed_updates"]
    assert summary["privacy"]["he_params"]["poly_modulus_degree"] > 0
    assert summary["final_metrics"]["accuracy"] > 0.85
    assert summary["centralized_baseline"]["accuracy"] > 0.85
    assert summary["rejected"] == []

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["aggregated"] and sorted(r["train_sites"]) == ["north", "south"] for r in rows)
    assert all(sorted(r["evaluate_sites"]) == ["north", "south"] for r in rows)

    assert (out / "model-encrypted.safetensors").is_file()  # what the server holds
    state = torch.load(out / "model.pt", weights_only=True)  # decrypted by the launcher with a site's key
    model = model_for(load_config(path=cfg_path))
    model.load_state_dict(state)  # the final model fits the configured architecture
    assert json.loads((out / "config.json").read_text())["name"] == "e2e"
    assert (out / "logs" / "run.log").read_text()

    assert processes_under(tmp_path) == [], "Flower processes were left running"
