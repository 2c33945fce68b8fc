"""FedAttFedAvg: the FedAtt step and its attention weights on a hand-computed example, noise, options, registration."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from dmsc_fed.errors import ConfigError
from dmsc_fed.sites import SiteInfo
from strategies import STRATEGIES, FedAttFedAvg, check_options, resolve_strategy, strategy_for
from strategies.aggregators import fedatt
from strategies.validation import specs_of
from tests.conftest import make_config

needs_identity = pytest.mark.usefixtures("flwr_identity")

SITES = {
    i: SiteInfo(name=name, node_id=i, num_train=100, num_test=10, device="cpu", version="t")
    for i, name in ((1, "s1"), (2, "s2"), (3, "s3"))
}


def _arrays(a: list[float], b: list[float]) -> ArrayRecord:
    return ArrayRecord({"a": Array(np.array(a, dtype=np.float32)), "b": Array(np.array(b, dtype=np.float32))})


# The server model: a = (0, 0), b = (1).
SERVER = _arrays([0.0, 0.0], [1.0])


def _fedatt(initial: ArrayRecord = SERVER, **options: Any) -> FedAttFedAvg:
    return FedAttFedAvg(sites=SITES, expected_arrays=specs_of(initial), **options)


def _reply(node: int, arrays: ArrayRecord, n: int = 10) -> Message:
    out = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
    return Message(content=content, reply_to=out)


def _two_site_round(strat: FedAttFedAvg, server_round: int = 1) -> ArrayRecord:
    strat.current = SERVER  # what configure_train sent
    # s1: a = (3, 4), 5 away from the server; b = (1), 0 away.
    # s2: a = (0, 0), 0 away;                 b = (3), 2 away.
    arrays, _ = strat.aggregate_train(
        server_round, [_reply(1, _arrays([3.0, 4.0], [1.0]), 10), _reply(2, _arrays([0.0, 0.0], [3.0]), 90)]
    )
    assert arrays is not None
    return arrays


# FedAtt: alpha_k^l = exp(s_k^l) / sum_j exp(s_j^l), s_k^l = ||w^l - w_k^l||_2, per layer over the sites.
E5, E2 = math.exp(5.0), math.exp(2.0)
ALPHA = {
    "s1": {"a": E5 / (E5 + 1.0), "b": 1.0 / (1.0 + E2)},
    "s2": {"a": 1.0 / (E5 + 1.0), "b": E2 / (1.0 + E2)},
}


@needs_identity
def test_attention_weights_of_the_round_are_the_fedatt_softmax() -> None:
    strat = _fedatt(step_size=0.5)
    _two_site_round(strat)
    assert set(strat.last_attention) == {"s1", "s2"}
    for site, layers in ALPHA.items():
        assert strat.last_attention[site] == pytest.approx(layers, rel=1e-12)
    for layer in ("a", "b"):
        assert sum(strat.last_attention[s][layer] for s in ALPHA) == pytest.approx(1.0)


@needs_identity
def test_fedatt_step_hand_computed() -> None:
    strat = _fedatt(step_size=0.5)
    arrays = _two_site_round(strat)
    # a: 0 - 0.5 * (alpha_s1 * ((0, 0) - (3, 4)) + alpha_s2 * 0) = 0.5 * alpha_s1 * (3, 4)
    np.testing.assert_allclose(arrays["a"].numpy(), [1.5 * ALPHA["s1"]["a"], 2.0 * ALPHA["s1"]["a"]], rtol=1e-6)
    # b: 1 - 0.5 * (alpha_s1 * 0 + alpha_s2 * (1 - 3)) = 1 + alpha_s2
    np.testing.assert_allclose(arrays["b"].numpy(), [1.0 + ALPHA["s2"]["b"]], rtol=1e-6)
    assert arrays["a"].numpy().dtype == np.float32
    # the sample counts (10, 90) play no part: attention alone weighs the sites
    assert strat.current is arrays


@needs_identity
def test_unit_step_is_the_attention_weighted_average() -> None:
    strat = _fedatt()
    arrays = _two_site_round(strat)
    # a: alpha_s1 * (3, 4) + alpha_s2 * (0, 0); b: alpha_s1 * 1 + alpha_s2 * 3
    np.testing.assert_allclose(arrays["a"].numpy(), [3.0 * ALPHA["s1"]["a"], 4.0 * ALPHA["s1"]["a"]], rtol=1e-6)
    np.testing.assert_allclose(arrays["b"].numpy(), [ALPHA["s1"]["b"] + 3.0 * ALPHA["s2"]["b"]], rtol=1e-6)


@needs_identity
def test_rejected_replies_get_no_attention() -> None:
    strat = _fedatt()
    strat.current = SERVER
    arrays, _ = strat.aggregate_train(
        1, [_reply(1, _arrays([3.0, 4.0], [1.0])), _reply(3, _arrays([math.nan, 0.0], [1.0]))]
    )
    assert arrays is not None
    assert strat.last_attention == {"s1": {"a": 1.0, "b": 1.0}}
    np.testing.assert_allclose(arrays["a"].numpy(), [3.0, 4.0])
    assert [r["site"] for r in strat.reports[-1].rejected] == ["s3"]


@needs_identity
def test_noise_is_seeded_by_seed_and_round() -> None:
    def run(seed: int, server_round: int) -> ArrayRecord:
        return _two_site_round(_fedatt(step_size=0.5, noise_std=0.1, seed=seed), server_round)

    first = run(7, 1)
    np.testing.assert_array_equal(first["a"].numpy(), run(7, 1)["a"].numpy())
    assert not np.array_equal(first["a"].numpy(), run(8, 1)["a"].numpy())
    assert not np.array_equal(first["a"].numpy(), run(7, 2)["a"].numpy())
    # exactly the pure function with the strategy's generator for that round
    ref = fedatt(
        server={"a": np.zeros(2, np.float32), "b": np.ones(1, np.float32)},
        updates=[
            {"a": np.array([3, 4], np.float32), "b": np.array([1], np.float32)},
            {"a": np.zeros(2, np.float32), "b": np.array([3], np.float32)},
        ],
        step_size=0.5,
        noise_std=0.1,
        rng=np.random.default_rng([7, 1]),
    )
    for key in ("a", "b"):
        np.testing.assert_array_equal(first[key].numpy(), ref[key])


@needs_identity
def test_noise_has_the_requested_standard_deviation() -> None:
    n = 20_000
    zeros = ArrayRecord({"w": Array(np.zeros(n, dtype=np.float32))})
    strat = _fedatt(zeros, noise_std=0.3, seed=-5)  # negative seeds work too
    strat.current = zeros
    arrays, _ = strat.aggregate_train(1, [_reply(1, zeros)])
    assert arrays is not None
    values = arrays["w"].numpy()
    assert np.std(values) == pytest.approx(0.3, rel=0.03)
    assert abs(np.mean(values)) < 0.3 * 4 / math.sqrt(n)


@needs_identity
def test_aggregating_without_a_global_model_is_an_error() -> None:
    strat = _fedatt()
    with pytest.raises(RuntimeError, match="configure_train has not run"):
        strat.aggregate_train(1, [_reply(1, _arrays([3.0, 4.0], [1.0]))])


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"step_size": 0.0}, "step_size must be a finite number > 0"),
        ({"step_size": -1.0}, "step_size"),
        ({"step_size": math.nan}, "step_size"),
        ({"step_size": math.inf}, "step_size"),
        ({"step_size": True}, "step_size"),
        ({"step_size": "1"}, "step_size"),
        ({"noise_std": -0.1}, "noise_std must be a finite number >= 0"),
        ({"noise_std": math.nan}, "noise_std"),
        ({"noise_std": math.inf}, "noise_std"),
    ],
)
def test_bad_options(options: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        FedAttFedAvg.for_model(initial=SERVER, sites=SITES, **options)


def test_good_options_are_kept() -> None:
    strat = _fedatt(step_size=1.2, noise_std=0, seed=4)
    assert (strat.step_size, strat.noise_std, strat.seed) == (1.2, 0.0, 4)


def test_registered_and_options_checked() -> None:
    assert STRATEGIES["fedatt"] is FedAttFedAvg
    assert resolve_strategy("fedatt") is FedAttFedAvg
    check_options(FedAttFedAvg, {"step_size": 0.5, "noise_std": 0.01})
    with pytest.raises(ConfigError, match=r"does not take option\(s\) \['epsilon'\]"):
        check_options(FedAttFedAvg, {"epsilon": 0.5})
    with pytest.raises(ConfigError, match="set by the framework"):
        check_options(FedAttFedAvg, {"seed": 1})
    cfg = make_config(strategy={"name": "fedatt", "options": {"step_size": 0.5, "noise_std": 0.01}})
    assert strategy_for(cfg) is FedAttFedAvg
    from strategies.encrypted_attention import EncryptedFedAtt

    # With encryption on, FedAtt runs as its two-phase encrypted protocol (tests/unit/test_encrypted_attention.py).
    assert strategy_for(make_config(strategy={"name": "fedatt"}, privacy={"encryption": "ckks"})) is EncryptedFedAtt
