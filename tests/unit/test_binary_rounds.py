"""Binary tasks: sites send confusion counts and score histograms; the server sums them exactly."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients.site import handle_evaluate
from dmsc_fed.metrics import binary_counts, binary_scores, merge_counts, to_metric_lists
from dmsc_fed.sites import SiteInfo
from dmsc_fed.training import model_for
from dmsc_fed.wire import CONFIG_KEY, ROUND_KEY, TASK_ID_KEY, TASK_KEY
from strategies import WeightedFedAvg
from tests.conftest import make_config

pytestmark = pytest.mark.usefixtures("flwr_identity")

SITES = {
    i: SiteInfo(name=n, node_id=i, num_train=10, num_test=4, device="cpu", version="t") for i, n in enumerate("ab", 1)
}


class Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _strategy() -> tuple[WeightedFedAvg, dict[int, Message]]:
    initial = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    strat = WeightedFedAvg.for_model(initial=initial, sites=SITES)
    strat.configure_train(1, initial, ConfigRecord(), Grid())  # type: ignore[arg-type]
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_evaluate(1, initial, ConfigRecord(), Grid())}  # type: ignore[arg-type]
    return strat, msgs


def _reply(msg: Message, labels: list[int], scores: list[float]) -> Message:
    counts = binary_counts(labels=np.array(labels), scores=np.array(scores), bins=10)
    metrics = {"num-examples": len(labels), "loss": 0.5, "accuracy": 0.5, **to_metric_lists(counts)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)  # type: ignore[arg-type]


def test_precision_recall_and_auc_come_from_the_summed_counts() -> None:
    strat, msgs = _strategy()
    a = ([1, 0, 0, 1], [0.95, 0.15, 0.65, 0.35])
    b = ([0, 1, 0, 0], [0.05, 0.85, 0.25, 0.45])
    strat.aggregate_evaluate(1, [_reply(msgs[1], *a), _reply(msgs[2], *b)])
    ev = strat.reports[-1].evaluate
    # Pooled: positives 0.95, 0.35, 0.85; negatives 0.15, 0.65, 0.05, 0.25, 0.45 -> tp 2, fn 1, fp 1, tn 4.
    assert ev["precision"] == pytest.approx(2 / 3) and ev["recall"] == pytest.approx(2 / 3)
    # AUC: pairs (pos > neg) = 0.95:5, 0.85:5, 0.35:3 (0.15, 0.05, 0.25) -> 13 of 15.
    assert ev["auc"] == pytest.approx(13 / 15)
    pooled = merge_counts([binary_counts(labels=np.array(x), scores=np.array(s), bins=10) for x, s in (a, b)])
    assert binary_scores(pooled)["auc"] == pytest.approx(ev["auc"])


def test_counts_that_do_not_add_up_are_rejected() -> None:
    strat, msgs = _strategy()
    bad = _reply(msgs[1], [1, 0, 0], [0.9, 0.1, 0.2])  # 3 counted samples
    bad.content["metrics"]["num-examples"] = 4
    strat.aggregate_evaluate(1, [bad, _reply(msgs[2], [0, 1], [0.1, 0.8])])
    (rejected,) = strat.reports[-1].rejected
    assert rejected["site"] == "a" and "add up to 3" in rejected["reason"]


def test_a_site_reports_counts_for_a_binary_task(tmp_path) -> None:
    cfg = make_config(dataset={"name": "breast_cancer", "scaling": "local"})
    initial = ArrayRecord(model_for(cfg, seed=0).state_dict())
    config = ConfigRecord({TASK_KEY: cfg.to_json(), TASK_ID_KEY: "t/1", ROUND_KEY: 1})
    request = Message(
        content=RecordDict({"arrays": initial, CONFIG_KEY: config}), dst_node_id=1, message_type="evaluate"
    )
    reply = handle_evaluate(request.content, {"site-name": "a", "state-dir": str(tmp_path)})
    m = reply["metrics"]
    assert sum(m["bin-counts"]) == m["num-examples"] and sum(m["pos-hist"]) + sum(m["neg-hist"]) == m["num-examples"]
