"""Segmented rounds: sites train and return their segments; the server aggregates each by its rule or under CKKS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients import segments
from clients.site import handle_train
from dmsc_fed.errors import ConfigError
from dmsc_fed.privacy.he import create_contexts, encrypt, get_profile, load_public_context, load_secret_context
from dmsc_fed.segmentation.block import ParamSlice, plan_blocks
from dmsc_fed.segmentation.layout import RunSegment, SegmentLayout, open_segments
from dmsc_fed.segmentation.task import plan_task
from dmsc_fed.sites import SiteInfo
from dmsc_fed.training import model_for
from dmsc_fed.wire import (
    CONFIG_KEY,
    ROUND_KEY,
    SEGMENT_NAMES,
    SEGMENT_WEIGHT_TOTALS,
    SEGMENTS_KEY,
    TASK_ID_KEY,
    TASK_KEY,
    segment_chunk_key,
    segment_key,
    segment_weight_key,
)
from strategies.segmented import SegmentedFedAvg
from tests.conftest import make_config

pytestmark = pytest.mark.usefixtures("flwr_identity")
PROFILE = get_profile("add-128")


class Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


SITES = {
    i: SiteInfo(name=n, node_id=i, num_train=10 * i, num_test=5, device="cpu", version="t")
    for i, n in enumerate("abc", start=1)
}


def _seg(name: str, start: int, stop: int, sites: str, *, rule: str = "mean", encrypted: bool = False) -> RunSegment:
    return RunSegment(
        name=name,
        pieces=(ParamSlice(name="w", start=start, stop=stop),),
        sites=tuple(sites),
        dp=False,
        encrypted=encrypted,
        rule=rule,
    )


def _layout(*segs: RunSegment) -> SegmentLayout:
    return SegmentLayout(mode="block", segments=segs, shapes=(("w", (6,)),))


def _strategy(layout: SegmentLayout, **kwargs) -> tuple[ArrayRecord, SegmentedFedAvg]:
    initial = ArrayRecord({"w": Array(np.zeros(6, dtype=np.float32))})
    return initial, SegmentedFedAvg.for_layout(initial=initial, layout=layout, sites=SITES, **kwargs)


def _reply(msg: Message, arrays: dict[str, np.ndarray], n: int, **metrics: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, **metrics}),
        }
    )
    return Message(content=content, reply_to=msg)


def _plain(name: str, value: float, size: int = 2) -> dict[str, np.ndarray]:
    return {segment_key(name): np.full(size, value, dtype=np.float32)}


def test_each_block_is_averaged_over_the_sites_that_trained_it() -> None:
    plan = plan_blocks(parameters={"w": (6,)}, capacities={"a": 1.0, "b": 1.0, "c": 1.0}, block_count=3, replication=2)
    layout = _layout(*(_seg(b.name, b.offset, b.offset + b.length, "".join(b.sites)) for b in plan.blocks))
    initial, strat = _strategy(layout)
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(1, initial, ConfigRecord(), Grid([1, 2, 3]))}
    assert {n: tuple(m.content["config"][SEGMENT_NAMES]) for n, m in msgs.items()} == {
        n: tuple(f"block-{i}" for i in plan.blocks_of(site=SITES[n].name)) for n in msgs
    }
    # Every site sends value = its node id for each of its blocks; weights are 10, 20, 30 samples.
    replies = [
        _reply(
            msgs[n],
            {k: v for b in plan.blocks_of(site=SITES[n].name) for k, v in _plain(f"block-{b}", n).items()},
            10 * n,
        )
        for n in msgs
    ]
    arrays, _ = strat.aggregate_train(1, replies)
    assert arrays is not None
    expected = []
    for block in plan.blocks:
        nodes = [n for n in msgs if SITES[n].name in block.sites]
        expected += [sum(10 * n * n for n in nodes) / sum(10 * n for n in nodes)] * block.length
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)


def test_bad_replies_are_left_out_and_their_segments_kept_from_the_others() -> None:
    layout = _layout(_seg("s0", 0, 2, "ab"), _seg("s1", 2, 4, "bc"), _seg("s2", 4, 6, "ca"))
    initial, strat = _strategy(layout)
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(1, initial, ConfigRecord(), Grid([1, 2, 3]))}
    good = _plain("s0", 1.0) | _plain("s2", 1.0)  # a's segments
    wrong = _plain("s0", 5.0) | _plain("s2", 5.0)  # b sends a's segments
    nan = _plain("s1", float("nan")) | _plain("s2", float("nan"))
    arrays, _ = strat.aggregate_train(
        1, [_reply(msgs[1], good, 10), _reply(msgs[2], wrong, 20), _reply(msgs[3], nan, 30)]
    )
    reasons = {r["site"]: r["reason"] for r in strat.reports[-1].rejected}
    assert "exactly the site's segments" in reasons["b"] and "non-finite" in reasons["c"]
    assert arrays is not None
    assert arrays["w"].numpy().tolist() == [1, 1, 0, 0, 1, 1]  # s1 only b and c trained: keeps its zeros


def test_each_segment_takes_its_own_rule() -> None:
    # s0 by sample-weighted mean over a, b, c; s1 by coordinate median over the same three.
    layout = _layout(_seg("s0", 0, 3, "abc"), _seg("s1", 3, 6, "abc", rule="median"))
    initial, strat = _strategy(layout)
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(1, initial, ConfigRecord(), Grid([1, 2, 3]))}
    values = {1: 1.0, 2: 2.0, 3: 30.0}
    replies = [_reply(msgs[n], _plain("s0", values[n], 3) | _plain("s1", values[n], 3), 10 * n) for n in msgs]
    arrays, _ = strat.aggregate_train(1, replies)
    assert arrays is not None
    mean = (10 * 1 + 20 * 2 + 30 * 30) / 60  # 15.833...
    np.testing.assert_allclose(arrays["w"].numpy(), [mean] * 3 + [2.0] * 3, rtol=1e-6)


def test_an_encrypted_segment_is_added_as_ciphertexts_and_decrypts_to_the_weighted_mean() -> None:
    secret, public = create_contexts(profile=PROFILE)
    sctx = load_secret_context(secret)
    layout = _layout(_seg("plain", 0, 3, "abc"), _seg("secret", 3, 6, "ab", encrypted=True))
    initial, strat = _strategy(
        layout, public_context=load_public_context(public), slots=PROFILE.slots, max_chunk_bytes=10**7
    )
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(1, initial, ConfigRecord(), Grid([1, 2, 3]))}
    assert list(msgs[1].content["config"][SEGMENT_WEIGHT_TOTALS]) == [60.0, 30.0]  # a+b+c, a+b
    replies = []
    for n, msg in msgs.items():
        arrays = _plain("plain", float(n), 3)
        metrics: dict[str, float] = {}
        if SITES[n].name in "ab":
            w = 10 * n / 30
            for i, chunk in enumerate(encrypt(ctx=sctx, values=np.full(3, 100.0 * n) * w)):
                arrays[segment_chunk_key("secret", i)] = np.frombuffer(chunk, dtype=np.uint8)
            metrics[segment_weight_key("secret")] = w
        replies.append(_reply(msg, arrays, 10 * n, **metrics))
    arrays, _ = strat.aggregate_train(1, replies)
    assert arrays is not None and not strat.reports[-1].rejected
    assert arrays["w"].numpy()[3:].tolist() == [0, 0, 0]  # the server holds no plaintext of the secret segment
    state = open_segments(values={k: a.numpy() for k, a in arrays.items()}, layout=layout, ctx=sctx)
    plain = (10 * 1 + 20 * 2 + 30 * 3) / 60
    secret_mean = (10 * 100 + 20 * 200) / 30
    np.testing.assert_allclose(state["w"], [plain] * 3 + [secret_mean] * 3, rtol=1e-5)

    # Round 2: nobody returns the encrypted segment; its ciphertexts and weight carry over unchanged.
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(2, arrays, ConfigRecord(), Grid([3]))}
    again, _ = strat.aggregate_train(2, [_reply(msgs[3], _plain("plain", 7.0, 3), 30)])
    assert again is not None
    assert again[segment_weight_key("secret")].numpy().tolist() == arrays[segment_weight_key("secret")].numpy().tolist()
    state = open_segments(values={k: a.numpy() for k, a in again.items()}, layout=layout, ctx=sctx)
    np.testing.assert_allclose(state["w"], [7.0] * 3 + [secret_mean] * 3, rtol=1e-5)


def test_an_encrypted_reply_with_an_inflated_weight_is_rejected() -> None:
    secret, public = create_contexts(profile=PROFILE)
    layout = _layout(_seg("secret", 0, 6, "ab", encrypted=True))
    initial, strat = _strategy(
        layout, public_context=load_public_context(public), slots=PROFILE.slots, max_chunk_bytes=10**7
    )
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(1, initial, ConfigRecord(), Grid([1, 2]))}
    chunk = encrypt(ctx=load_secret_context(secret), values=np.ones(6))[0]
    bad = _reply(
        msgs[1],
        {segment_chunk_key("secret", 0): np.frombuffer(chunk, dtype=np.uint8)},
        10,
        **{segment_weight_key("secret"): 0.9},
    )
    strat.aggregate_train(1, [bad])
    assert "does not match" in strat.reports[-1].rejected[0]["reason"]


def test_an_encrypted_segment_cannot_take_a_plaintext_rule() -> None:
    with pytest.raises(ConfigError, match="only add"):
        _layout(_seg("s", 0, 6, "ab", rule="median", encrypted=True))


def test_the_layout_travels_as_json() -> None:
    layout = _layout(_seg("s0", 0, 2, "ab"), _seg("s1", 2, 6, "c", rule="krum", encrypted=False))
    assert SegmentLayout.from_json(layout.to_json()) == layout
    with pytest.raises(ConfigError, match="malformed"):
        SegmentLayout.from_json('{"mode": "block"}')


def test_site_freezes_untouched_tensors_and_returns_only_its_segments() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))  # 6 + 2 + 4 + 2 values
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    seg = RunSegment(
        name="block-1",
        pieces=(ParamSlice(name="0.weight", start=2, stop=6),),
        sites=("a",),
        dp=False,
        encrypted=False,
        rule="mean",
    )
    layout = SegmentLayout(mode="block", segments=(seg,), shapes=shapes)
    config = ConfigRecord({SEGMENTS_KEY: layout.to_json(), SEGMENT_NAMES: ["block-1"], SEGMENT_WEIGHT_TOTALS: [10.0]})
    plan = segments.assignment(config, site="a")
    assert plan is not None
    assert segments.freeze_outside(model, plan) == ["0.weight"]
    assert [p.requires_grad for p in model.parameters()] == [True, False, False, False]
    arrays, weights = segments.seal_segments(model, plan, num_examples=5, encrypt=None)
    flat = model.state_dict()["0.weight"].flatten().numpy()
    assert list(arrays) == ["seg:block-1"] and arrays["seg:block-1"].numpy().tolist() == flat[2:6].tolist()
    assert weights == {}
    with pytest.raises(ConfigError, match="gives to others"):
        segments.assignment(config, site="b")


def test_handle_train_in_block_mode(tmp_path) -> None:
    cfg = make_config(
        dataset={"name": "digits"},
        model={"name": "cnn"},
        local_epochs=1,
        segmentation={"mode": "block", "block": {"block_count": 4, "replication": 2}},
    )
    initial = ArrayRecord(model_for(cfg, seed=0).state_dict())
    layout = plan_task(
        cfg, shapes=[(k, tuple(a.shape)) for k, a in initial.items()], members=["a", "b", "c"], fallback="mean"
    )
    mine = [s.name for s in layout.of_site("a")]
    config = ConfigRecord(
        {
            TASK_KEY: cfg.to_json(),
            TASK_ID_KEY: "t/1",
            ROUND_KEY: 1,
            SEGMENTS_KEY: layout.to_json(),
            SEGMENT_NAMES: mine,
            SEGMENT_WEIGHT_TOTALS: [1.0] * len(mine),
        }
    )
    request = Message(content=RecordDict({"arrays": initial, CONFIG_KEY: config}), dst_node_id=1, message_type="train")
    reply = handle_train(request.content, {"site-name": "a", "state-dir": str(tmp_path)})
    arrays = reply["arrays"]
    assert sorted(arrays) == sorted(segment_key(n) for n in mine)
    for name in mine:
        assert arrays[segment_key(name)].numpy().shape == (layout.segment(name).size,)
    assert 0.0 <= reply["metrics"]["val-accuracy"] <= 1.0


def test_business_mode_sends_each_site_only_its_segments(tmp_path) -> None:
    from dmsc_fed.config import load_config, parse_config
    from tests.conftest import ROOT

    cfg = load_config(path=ROOT / "examples/multitask/config.toml")
    data = cfg.model_dump(mode="json") | {"local_epochs": 1, "privacy": {}}
    data["dataset"]["scaling"] = "local"
    cfg = parse_config(data=data)
    initial = ArrayRecord(model_for(cfg, seed=0).state_dict())
    members = [s.name for s in cfg.sites]
    layout = plan_task(cfg, shapes=[(k, tuple(a.shape)) for k, a in initial.items()], members=members, fallback="mean")
    sites = {
        i: SiteInfo(name=n, node_id=i, num_train=500, num_test=100, device="cpu", version="t")
        for i, n in enumerate(members, 1)
    }
    strat = SegmentedFedAvg.for_layout(initial=initial, layout=layout, sites=sites)
    config = ConfigRecord({TASK_KEY: cfg.to_json(), TASK_ID_KEY: "t/1", SEGMENTS_KEY: layout.to_json()})
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(1, initial, config, Grid([1, 2, 3]))}
    sent = {
        sites[n].name: sorted({k.split(".")[0] + "." + k.split(".")[1] for k in m.content["arrays"]})
        for n, m in msgs.items()
    }
    assert sent["hospital-a"] == ["backbone.0", "backbone.2", "heads.diagnosis"]
    assert sent["hospital-c"] == ["backbone.0", "backbone.2", "heads.readmission"]
    reply = handle_train(msgs[3].content, {"site-name": "hospital-c", "state-dir": str(tmp_path)})
    assert sorted(reply["arrays"]) == [segment_key("backbone"), segment_key("readmission")]
