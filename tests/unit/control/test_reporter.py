"""The ServerApp's reporter writes sites, rounds, faults, privacy and model versions into a real store file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from dmsc_fed.control import Store, sqlite_url
from dmsc_fed.sites import SiteInfo
from server.control import ControlReporter
from strategies import RoundReport
from tests.conftest import make_config


def test_a_round_lands_in_the_registry_the_event_log_and_the_model_store(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "c.db")
    with Store.open(url) as store:
        store.registry.define_pool(name="cpu", device="cpu", capacity=1)
    cfg = make_config()
    reporter = ControlReporter(url=url, task="7", cfg=cfg)
    sites = {
        i: SiteInfo(name=n, node_id=i, num_train=20, num_test=5, device="cpu", version="0.1.0", cpu_cores=2)
        for i, n in enumerate("abc", 1)
    }
    reporter.joined(sites, None)
    report = RoundReport(round=1, sampled=["a", "b", "c"], train_sites=["a", "b"], evaluate_sites=["a", "b"])
    report.per_site = {"a": {"train": {"epsilon": 0.5, "cpu-seconds": 3.0}}, "b": {"train": {"epsilon": 0.4}}}
    report.rejected = [{"site": "c", "stage": "train", "reason": "non-finite values"}]
    report.evaluate = {"accuracy": 0.9, "loss": 0.3}
    report.aggregated = True
    model = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    reporter.round_done(report, model=model, bytes_down=36, he_params=None)
    reporter.close()
    with Store.open(url) as store:
        by_name = {s.name: s for s in store.registry.sites()}
        assert by_name["a"].cpu_cores == 2 and by_name["a"].dataset_size == 25 and by_name["c"].missed_replies == 1
        (version,) = store.models.versions(task_id="7")
        assert version.round == 1 and version.metrics["accuracy"] == 0.9 and version.epsilon == {"a": 0.5, "b": 0.4}
        kinds = [e.kind for e in store.events.events(task_id="7")]
        assert {"allocation", "round", "fault", "privacy"} <= set(kinds)
        (event,) = store.events.events(kind="round", task_id="7")
        assert event.payload["participants"] == 2 and event.payload["hardware"] == {"a": {"cpu-seconds": 3.0}, "b": {}}
