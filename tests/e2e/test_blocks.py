"""End-to-end: block segmentation of the digits CNN over a GPU pool and a CPU pool of sites, CKKS on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import ROOT, processes_under, run_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_block_mode_example(tmp_path: Path) -> None:
    _res, out, summary = run_job(ROOT / "examples/blocks/config.toml", tmp_path, timeout=840)
    assert summary["rounds_completed"] == 3 and summary["rejected"] == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(sorted(r["train_sites"]) == ["cpu-a", "cpu-b", "gpu-a", "gpu-b"] for r in rows)
    seg = summary["segmentation"]
    assert seg["mode"] == "block" and len(seg["segments"]) == 8
    assert all(s["encrypted"] and len(s["sites"]) == 2 for s in seg["segments"])
    held = {site: sum(site in s["sites"] for s in seg["segments"]) for site in ("gpu-a", "gpu-b", "cpu-a", "cpu-b")}
    assert held["gpu-a"] > held["cpu-a"] and held["gpu-b"] > held["cpu-b"]  # the GPU pool takes more blocks
    assert summary["privacy"]["encryption"] == "ckks" and summary["privacy"]["he_params"] is not None
    assert (out / "model-encrypted.safetensors").exists() and (out / "model.pt").exists()  # decrypted by a site
    assert summary["final_metrics"]["accuracy"] > 0.7  # chance: 0.10
    assert processes_under(tmp_path) == []
