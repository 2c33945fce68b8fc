from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from dmsc_fed.sites import SiteInfo
from strategies import WeightedFedAvg

pytestmark = pytest.mark.usefixtures("flwr_identity")


def _site(node: int, name: str, n: int = 100) -> SiteInfo:
    return SiteInfo(name=name, node_id=node, num_train=n, num_test=n, device="cpu", version="t")


def _reply(node: int, w: list[float], n: int) -> Message:
    out = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.array(w, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": n, "loss": float(n)}),
        }
    )
    return Message(content=content, reply_to=out)


def test_bad_reply_is_left_out_and_the_rest_averaged() -> None:
    reports = []
    initial = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    strat = WeightedFedAvg.for_model(
        initial=initial, sites={1: _site(1, "a"), 2: _site(2, "b"), 3: _site(3, "c", n=5)}, on_round=reports.append
    )
    replies = [
        _reply(1, [1.0, 1.0], 10),
        _reply(2, [4.0, 7.0], 30),
        _reply(3, [100.0, 100.0], 50),  # claims 50 samples, declared 5
        _reply(9, [100.0, 100.0], 5),  # not a member
    ]
    arrays, metrics = strat.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    # (10*1 + 30*4)/40 = 3.25, (10*1 + 30*7)/40 = 5.5
    assert arrays["w"].numpy().tolist() == [3.25, 5.5]
    assert metrics["num-examples"] == 40.0
    assert metrics["loss"] == pytest.approx((10 * 10 + 30 * 30) / 40)
    rep = strat.reports[-1]
    assert rep.train_sites == ["a", "b"]
    reasons = {r["site"]: r["reason"] for r in rep.rejected}
    assert "exceeds the 5 samples" in reasons["c"]
    assert "not a member" in reasons["node-9"]
    strat.aggregate_evaluate(1, [])
    strat.close_round(strat.reports[-1])
    assert reports and reports[0].round == 1 and reports[0].aggregated


def test_no_valid_reply_keeps_the_model() -> None:
    initial = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    strat = WeightedFedAvg.for_model(initial=initial, sites={1: _site(1, "a")})
    arrays, metrics = strat.aggregate_train(1, [_reply(1, [np.nan, 0.0], 10)])
    assert arrays is None and metrics is None
    assert not strat.reports[-1].aggregated
    assert "non-finite" in strat.reports[-1].rejected[0]["reason"]
