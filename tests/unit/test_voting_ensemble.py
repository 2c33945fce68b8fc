"""Voting ensemble: the server keeps every site's model; sites evaluate the ensemble by majority or soft vote."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients import ensemble
from clients.site import handle_evaluate, handle_train
from dmsc_fed.data import load_site_data
from dmsc_fed.errors import ConfigError
from dmsc_fed.sites import SiteInfo
from dmsc_fed.training import model_for
from dmsc_fed.voting import soft_vote
from dmsc_fed.wire import CONFIG_KEY, ENSEMBLE_KEY, ROUND_KEY, TASK_ID_KEY, TASK_KEY, member_key
from strategies import VotingEnsemble
from strategies.registry import strategy_for
from tests.conftest import make_config

pytestmark = pytest.mark.usefixtures("flwr_identity")
SITES = {
    i: SiteInfo(name=n, node_id=i, num_train=10, num_test=4, device="cpu", version="t") for i, n in enumerate("ab", 1)
}


class Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _reply(msg: Message, value: float) -> Message:
    arrays = ArrayRecord({"w": Array(np.full(2, value, dtype=np.float32))})
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)


def test_members_are_kept_per_site_and_carried_over() -> None:
    initial = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    strat = VotingEnsemble.for_model(initial=initial, sites=SITES, voting="majority")
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(1, initial, ConfigRecord(), Grid([1, 2]))}
    assert msgs[1].content["config"][ENSEMBLE_KEY] == "majority"
    first, _ = strat.aggregate_train(1, [_reply(msgs[1], 1.0), _reply(msgs[2], 2.0)])
    assert first is not None and sorted(first) == [member_key("a", "w"), member_key("b", "w")]
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(2, first, ConfigRecord(), Grid([1]))}
    second, _ = strat.aggregate_train(2, [_reply(msgs[1], 5.0)])
    assert second is not None
    assert second[member_key("a", "w")].numpy().tolist() == [5.0, 5.0]
    assert second[member_key("b", "w")].numpy().tolist() == [2.0, 2.0]  # b did not reply: kept


def test_bad_voting_option_and_encryption_are_refused() -> None:
    with pytest.raises(ConfigError, match="voting"):
        VotingEnsemble.for_model(initial=ArrayRecord(), sites=SITES, voting="ranked")
    with pytest.raises(ConfigError, match="plaintext"):
        strategy_for(make_config(strategy={"name": "vote"}, privacy={"encryption": "ckks"}))


def test_a_site_trains_its_own_member_and_scores_the_soft_vote(tmp_path) -> None:
    cfg = make_config(dataset={"name": "breast_cancer", "scaling": "local"}, strategy={"name": "vote"})
    nets = [model_for(cfg, seed=s) for s in (1, 2)]
    record = ArrayRecord(
        {
            member_key(site, k): Array(v.numpy())
            for site, net in zip("ab", nets, strict=True)
            for k, v in net.state_dict().items()
        }
    )
    assert torch.equal(ensemble.own_member(record, site="b")["1.weight"], nets[1].state_dict()["1.weight"])
    config = ConfigRecord({TASK_KEY: cfg.to_json(), TASK_ID_KEY: "t/1", ROUND_KEY: 1, ENSEMBLE_KEY: "soft"})
    node = {"site-name": "a", "state-dir": str(tmp_path)}
    reply = handle_evaluate(RecordDict({"arrays": record, CONFIG_KEY: config}), node)
    data = load_site_data(cfg=cfg, site="a")
    probs = []
    for net in nets:
        net.eval()
        with torch.no_grad():
            probs.append(torch.softmax(net(torch.from_numpy(data.x_test)), dim=1).numpy())
    expected = (soft_vote(probabilities=probs).argmax(axis=1) == data.y_test).mean()
    assert reply["metrics"]["accuracy"] == pytest.approx(expected)
    assert sum(reply["metrics"]["bin-counts"]) == data.num_test
    trained = handle_train(RecordDict({"arrays": record, CONFIG_KEY: config}), node)
    assert sorted(trained["arrays"]) == sorted(nets[0].state_dict())  # a plain model: a's member, trained
