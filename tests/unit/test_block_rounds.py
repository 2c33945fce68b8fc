"""Block mode: the site trains and returns its blocks; the server averages each block over its sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients import segments
from clients.site import handle_train
from dmsc_fed.segmentation.block import plan_blocks
from dmsc_fed.sites import SiteInfo
from dmsc_fed.training import model_for
from dmsc_fed.wire import CONFIG_KEY, ROUND_KEY, SEGMENT_BLOCKS, TASK_ID_KEY, TASK_KEY
from strategies.segmented import BlockFedAvg, block_key
from tests.conftest import make_config

pytestmark = pytest.mark.usefixtures("flwr_identity")


class Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _setup():
    # One parameter "w" of 6 values, cut into 3 blocks of 2, each trained by 2 of 3 equal sites.
    plan = plan_blocks(parameters={"w": (6,)}, capacities={"a": 1.0, "b": 1.0, "c": 1.0}, block_count=3, replication=2)
    sites = {
        i: SiteInfo(name=n, node_id=i, num_train=10 * i, num_test=5, device="cpu", version="t")
        for i, n in enumerate("abc", start=1)
    }
    initial = ArrayRecord({"w": Array(np.zeros(6, dtype=np.float32))})
    return plan, sites, initial, BlockFedAvg.for_model(initial=initial, plan=plan, sites=sites)


def _reply(msg: Message, values: dict[int, list[float]], n: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({block_key(i): Array(np.array(v, dtype=np.float32)) for i, v in values.items()}),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content=content, reply_to=msg)


def test_each_block_is_averaged_over_the_sites_that_trained_it() -> None:
    plan, sites, initial, strat = _setup()
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(1, initial, ConfigRecord(), Grid([1, 2, 3]))}
    assert {n: tuple(m.content["config"][SEGMENT_BLOCKS]) for n, m in msgs.items()} == {
        n: plan.blocks_of(site=sites[n].name) for n in msgs
    }
    # Every site sends value = its node id for each of its blocks; weights are 10, 20, 30 samples.
    replies = [_reply(msgs[n], {i: [float(n)] * 2 for i in plan.blocks_of(site=sites[n].name)}, 10 * n) for n in msgs]
    arrays, _ = strat.aggregate_train(1, replies)
    assert arrays is not None
    expected = []
    for block in plan.blocks:
        nodes = [n for n in msgs if sites[n].name in block.sites]
        expected += [sum(10 * n * n for n in nodes) / sum(10 * n for n in nodes)] * block.length
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)


def test_bad_block_replies_are_left_out_and_their_blocks_kept_from_the_others() -> None:
    plan, _sites, initial, strat = _setup()
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(1, initial, ConfigRecord(), Grid([1, 2, 3]))}
    good = {i: [1.0, 1.0] for i in plan.blocks_of(site="a")}
    wrong = {i: [5.0, 5.0] for i in plan.blocks_of(site="a")}  # b sends a's blocks
    nan = {i: [float("nan")] * 2 for i in plan.blocks_of(site="c")}
    arrays, _ = strat.aggregate_train(
        1, [_reply(msgs[1], good, 10), _reply(msgs[2], wrong, 20), _reply(msgs[3], nan, 30)]
    )
    reasons = {r["site"]: r["reason"] for r in strat.reports[-1].rejected}
    assert "expected blocks" in reasons["b"] and "non-finite" in reasons["c"]
    assert arrays is not None
    flat = arrays["w"].numpy()
    for block in plan.blocks:
        value = 1.0 if "a" in block.sites else 0.0  # blocks only b and c trained keep the old zeros
        assert flat[block.offset : block.offset + block.length].tolist() == [value] * block.length


def test_site_freezes_untouched_tensors_and_returns_only_its_blocks() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))  # 8 + 6 values
    plan = segments.Assignment(blocks=((1, 2, 4),))  # values 2..5: inside 0.weight
    assert segments.freeze_outside(model, plan) == ["0.weight"]
    assert [p.requires_grad for p in model.parameters()] == [True, False, False, False]
    blocks = segments.extract_blocks(model, plan)
    flat = torch.cat([t.flatten() for t in model.state_dict().values()]).numpy()
    assert list(blocks) == ["block-00001"] and blocks["block-00001"].numpy().tolist() == flat[2:6].tolist()


def test_handle_train_in_block_mode(tmp_path) -> None:
    cfg = make_config(dataset={"name": "digits"}, model={"name": "cnn"}, local_epochs=1)
    initial = ArrayRecord(model_for(cfg, seed=0).state_dict())
    config = ConfigRecord(
        {
            TASK_KEY: cfg.to_json(),
            TASK_ID_KEY: "t/1",
            ROUND_KEY: 1,
            SEGMENT_BLOCKS: [0, 3],
            "segment-offsets": [0, 300],
            "segment-lengths": [100, 50],
        }
    )
    request = Message(content=RecordDict({"arrays": initial, CONFIG_KEY: config}), dst_node_id=1, message_type="train")
    reply = handle_train(request.content, {"site-name": "a", "state-dir": str(tmp_path)})
    arrays = reply["arrays"]
    assert sorted(arrays) == ["block-00000", "block-00003"]
    assert arrays["block-00000"].numpy().shape == (100,) and arrays["block-00003"].numpy().shape == (50,)
