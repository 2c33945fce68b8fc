"""Score-weighted and fixed-weights averaging: the pure weights, the strategies, options and registration."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from dmsc_fed.errors import ConfigError
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import SCORE_KEY
from strategies import (
    STRATEGIES,
    FixedWeightsFedAvg,
    ScoreWeightedFedAvg,
    check_options,
    resolve_strategy,
    strategy_for,
)
from strategies.fixed_weights import renormalized_weights
from strategies.score_weighted import check_score, score_weights
from strategies.validation import specs_of
from tests.conftest import make_config

INITIAL = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})


def _site(node: int, name: str, n: int = 100) -> SiteInfo:
    return SiteInfo(name=name, node_id=node, num_train=n, num_test=n, device="cpu", version="t")


SITES = {1: _site(1, "a"), 2: _site(2, "b"), 3: _site(3, "c")}


def _score_weighted(**options: Any) -> ScoreWeightedFedAvg:
    return ScoreWeightedFedAvg(sites=SITES, expected_arrays=specs_of(INITIAL), **options)


def _fixed(**options: Any) -> FixedWeightsFedAvg:
    return FixedWeightsFedAvg(sites=SITES, expected_arrays=specs_of(INITIAL), **options)


def _reply(node: int, w: list[float], n: int, score: float | None = None) -> Message:
    out = Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    metrics: dict[str, int | float | list[int] | list[float]] = {"num-examples": n, "loss": 1.0}
    if score is not None:
        metrics[SCORE_KEY] = score
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(np.array(w, dtype=np.float32))}), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=out)


# ------------------------------------------------------------------ score_weights (pure)
def test_score_weights_hand_computed() -> None:
    assert score_weights(scores=[0.5, 0.25], samples=[10, 30]) == [0.5, 0.25]
    assert score_weights(scores=[0.5, 0.25], samples=[10, 30], times_samples=True) == [5.0, 7.5]
    assert score_weights(scores=[0.5, 0.25], samples=[10, 30], min_score=0.3) == [0.5, 0.0]
    assert score_weights(scores=[0.5, 0.25], samples=[10, 30], min_score=0.25) == [0.5, 0.25]  # at the bound: kept
    assert score_weights(scores=[0.5, 0.25], samples=[10, 30], min_score=0.9) == [0.0, 0.0]
    assert score_weights(scores=[0.0, 0.0], samples=[10, 30]) == [0.0, 0.0]


@pytest.mark.parametrize(
    ("scores", "samples", "min_score", "needle"),
    [
        ([0.5], [1, 2], 0.0, "1 scores but 2 sample counts"),
        ([1.5], [1], 0.0, r"score 0 must be a finite number in \[0, 1\]"),
        ([-0.1], [1], 0.0, "score 0"),
        ([math.nan], [1], 0.0, "score 0"),
        ([0.5], [-1], 0.0, "sample count 0"),
        ([0.5], [1], 1.5, "min_score"),
        ([0.5], [1], math.nan, "min_score"),
    ],
)
def test_score_weights_rejects_bad_input(
    scores: list[float], samples: list[float], min_score: float, needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        score_weights(scores=scores, samples=samples, min_score=min_score)


def test_check_score() -> None:
    assert check_score({SCORE_KEY: 0.0}) is None
    assert check_score({SCORE_KEY: 1}) is None
    assert "lack 'val-accuracy'" in str(check_score({}))
    assert "not finite" in str(check_score({SCORE_KEY: math.inf}))
    assert "outside [0, 1]" in str(check_score({SCORE_KEY: 1.5}))
    assert "must be a number" in str(check_score({SCORE_KEY: [0.5]}))


# ------------------------------------------------------------------ ScoreWeightedFedAvg
needs_identity = pytest.mark.usefixtures("flwr_identity")


@needs_identity
@pytest.mark.parametrize(
    ("options", "expected", "weights"),
    [
        # weights 0.5, 0.25: ((0.5*1 + 0.25*4)/0.75, (0.5*1 + 0.25*7)/0.75) = (2, 3)
        ({}, [2.0, 3.0], {"a": 2 / 3, "b": 1 / 3}),
        # weights 0.5*10 = 5, 0.25*30 = 7.5: ((5 + 30)/12.5, (5 + 52.5)/12.5) = (2.8, 4.6)
        ({"times_samples": True}, [2.8, 4.6], {"a": 0.4, "b": 0.6}),
        # b's 0.25 is below 0.3: only a counts
        ({"min_score": 0.3}, [1.0, 1.0], {"a": 1.0, "b": 0.0}),
    ],
)
def test_score_weighted_hand_computed(
    options: dict[str, object], expected: list[float], weights: dict[str, float]
) -> None:
    strat = _score_weighted(**options)
    arrays, metrics = strat.aggregate_train(1, [_reply(1, [1.0, 1.0], 10, 0.5), _reply(2, [4.0, 7.0], 30, 0.25)])
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)
    assert strat.last_weights == pytest.approx(weights)
    assert metrics["num-examples"] == 40.0  # the round's metrics stay sample-weighted


@needs_identity
def test_score_weighted_falls_back_to_samples_when_every_weight_is_zero(caplog: pytest.LogCaptureFixture) -> None:
    strat = _score_weighted(min_score=0.9)
    with caplog.at_level(logging.WARNING, logger="dmsc_fed.strategy"):
        arrays, _ = strat.aggregate_train(1, [_reply(1, [1.0, 1.0], 10, 0.5), _reply(2, [4.0, 7.0], 30, 0.25)])
    assert arrays is not None
    # sample weights 10, 30: ((10 + 120)/40, (10 + 210)/40) = (3.25, 5.5)
    assert arrays["w"].numpy().tolist() == [3.25, 5.5]
    assert strat.last_weights == {"a": 0.25, "b": 0.75}
    assert "averaging by sample count instead" in caplog.text and "min_score=0.9" in caplog.text


@needs_identity
@pytest.mark.parametrize(
    ("score", "needle"),
    [
        (None, "lack 'val-accuracy'"),
        (math.nan, "'val-accuracy' is not finite"),
        (1.5, "'val-accuracy' = 1.5 is outside [0, 1]"),
        (-0.5, "outside [0, 1]"),
    ],
)
def test_score_weighted_rejects_a_bad_score(score: float | None, needle: str) -> None:
    strat = ScoreWeightedFedAvg.for_model(initial=INITIAL, sites=SITES)
    arrays, _ = strat.aggregate_train(1, [_reply(1, [1.0, 1.0], 10, 0.5), _reply(2, [4.0, 7.0], 30, score)])
    assert arrays is not None and arrays["w"].numpy().tolist() == [1.0, 1.0]  # b left out
    rejected = strat.reports[-1].rejected
    assert [r["site"] for r in rejected] == ["b"]
    assert needle in rejected[0]["reason"]


@needs_identity
def test_score_weighted_base_checks_run_first() -> None:
    strat = ScoreWeightedFedAvg.for_model(initial=INITIAL, sites={1: _site(1, "a", n=5)})
    arrays, _ = strat.aggregate_train(1, [_reply(1, [1.0, 1.0], 50, 0.5)])
    assert arrays is None
    assert "exceeds the 5 samples" in strat.reports[-1].rejected[0]["reason"]


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"min_score": 1.5}, "min_score must be a number in"),
        ({"min_score": -0.1}, "min_score"),
        ({"min_score": math.nan}, "min_score"),
        ({"min_score": True}, "min_score"),
        ({"min_score": "0.5"}, "min_score"),
        ({"times_samples": "yes"}, "times_samples must be true or false"),
        ({"times_samples": 1}, "times_samples"),
    ],
)
def test_score_weighted_bad_options(options: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ScoreWeightedFedAvg.for_model(initial=INITIAL, sites=SITES, **options)


# ------------------------------------------------------------------ renormalized_weights (pure)
def test_renormalized_weights_hand_computed() -> None:
    weights = {"a": 3.0, "b": 1.0, "c": 0.0}
    assert renormalized_weights(names=["a", "b", "c"], weights=weights) == [0.75, 0.25, 0.0]
    assert renormalized_weights(names=["b"], weights=weights) == [1.0]
    assert renormalized_weights(names=["b", "a"], weights=weights) == [0.25, 0.75]
    assert renormalized_weights(names=["c"], weights=weights) == [0.0]


@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        ({"a": 1.0}, r"no fixed weight for site\(s\) \['b'\]"),
        ({"a": 1.0, "b": -1.0}, r"\['b'\] are not"),
        ({"a": math.inf, "b": 1.0}, r"\['a'\] are not"),
    ],
)
def test_renormalized_weights_rejects_bad_input(weights: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        renormalized_weights(names=["a", "b"], weights=weights)


# ------------------------------------------------------------------ FixedWeightsFedAvg
WEIGHTS = {"a": 3.0, "b": 1.0, "c": 0.0}


@needs_identity
@pytest.mark.parametrize(
    ("replies", "expected", "weights"),
    [
        # a and b with 3 and 1 (sample counts ignored): ((3*1 + 4)/4, (3*1 + 7)/4) = (1.75, 2.5)
        ([(1, [1.0, 1.0], 10), (2, [4.0, 7.0], 30)], [1.75, 2.5], {"a": 0.75, "b": 0.25}),
        # c has weight 0: a's model alone
        ([(1, [1.0, 1.0], 10), (3, [9.0, 9.0], 90)], [1.0, 1.0], {"a": 1.0, "c": 0.0}),
        # b alone: renormalised to 1
        ([(2, [4.0, 7.0], 30)], [4.0, 7.0], {"b": 1.0}),
    ],
)
def test_fixed_weights_hand_computed(
    replies: list[tuple[int, list[float], int]], expected: list[float], weights: dict[str, float]
) -> None:
    strat = _fixed(weights=WEIGHTS)
    arrays, _ = strat.aggregate_train(1, [_reply(*r) for r in replies])
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)
    assert strat.last_weights == pytest.approx(weights)


@needs_identity
def test_fixed_weights_renormalise_over_the_accepted_replies() -> None:
    strat = _fixed(weights=WEIGHTS)
    arrays, _ = strat.aggregate_train(1, [_reply(1, [math.nan, 1.0], 10), _reply(2, [4.0, 7.0], 30)])
    assert arrays is not None and arrays["w"].numpy().tolist() == [4.0, 7.0]  # a rejected, b alone
    assert [r["site"] for r in strat.reports[-1].rejected] == ["a"]


@needs_identity
def test_fixed_weights_keep_the_model_when_only_zero_weights_replied(caplog: pytest.LogCaptureFixture) -> None:
    strat = _fixed(weights=WEIGHTS)
    current = ArrayRecord({"w": Array(np.array([0.5, -0.5], dtype=np.float32))})
    strat.current = current
    with caplog.at_level(logging.WARNING, logger="dmsc_fed.strategy"):
        arrays, _ = strat.aggregate_train(1, [_reply(3, [9.0, 9.0], 90)])
    assert arrays is current
    assert "fixed weight 0" in caplog.text and "unchanged" in caplog.text


@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        (None, "needs option weights"),
        ({}, "non-empty table"),
        ("a=1", "non-empty table"),
        ({"a": 1.0, "b": -1.0, "c": 1.0}, r"bad: b=-1\.0"),
        ({"a": math.nan, "b": 1.0, "c": 1.0}, "bad: a=nan"),
        ({"a": math.inf, "b": 1.0, "c": 1.0}, "bad: a=inf"),
        ({"a": True, "b": 1.0, "c": 1.0}, "bad: a=True"),
        ({"a": "1", "b": 1.0, "c": 1.0}, "bad: a='1'"),
        ({"a": 0, "b": 0.0, "c": 0}, "all zero"),
        ({"a": 1.0}, r"no weight to member site\(s\) \['b', 'c'\]"),
    ],
)
def test_fixed_weights_bad_options(weights: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        FixedWeightsFedAvg.for_model(initial=INITIAL, sites=SITES, weights=weights)


def test_fixed_weights_naming_a_site_outside_the_federation_fail_the_config_check() -> None:
    from dmsc_fed.errors import ConfigError as Err
    from strategies.registry import strategy_for
    from tests.conftest import make_config

    bad = make_config(strategy={"name": "fixed-weights", "options": {"weights": {"a": 1, "b": 1, "c": 1, "z": 1}}})
    with pytest.raises(Err, match=r"names site\(s\) \['z'\] that are not members"):
        strategy_for(bad)
    good = make_config(strategy={"name": "fixed-weights", "options": {"weights": {"a": 1, "b": 1, "c": 1}}})
    assert strategy_for(good) is FixedWeightsFedAvg
    # A configured site that did not join may keep its weight: the strategy is built over the joined ones.
    joined = {n: s for n, s in SITES.items() if s.name != "c"}
    FixedWeightsFedAvg.for_model(initial=INITIAL, sites=joined, weights={"a": 1.0, "b": 1.0, "c": 1.0})


def test_fixed_weights_accepts_integer_weights() -> None:
    strat = _fixed(weights={"a": 2, "b": 1, "c": 0})
    assert strat.weights == {"a": 2.0, "b": 1.0, "c": 0.0}


# ------------------------------------------------------------------ registration and options
@pytest.mark.parametrize(
    ("name", "cls"), [("score-weighted", ScoreWeightedFedAvg), ("fixed-weights", FixedWeightsFedAvg)]
)
def test_registered_by_name(name: str, cls: type) -> None:
    assert STRATEGIES[name] is cls
    assert resolve_strategy(name) is cls


def test_options_are_checked() -> None:
    check_options(ScoreWeightedFedAvg, {"times_samples": True, "min_score": 0.5})
    check_options(FixedWeightsFedAvg, {"weights": {"a": 1.0}})
    with pytest.raises(ConfigError, match=r"does not take option\(s\) \['beta'\]"):
        check_options(ScoreWeightedFedAvg, {"beta": 0.1})
    with pytest.raises(ConfigError, match=r"does not take option\(s\) \['weight'\]"):
        check_options(FixedWeightsFedAvg, {"weight": {"a": 1.0}})
    with pytest.raises(ConfigError, match="set by the framework"):
        check_options(FixedWeightsFedAvg, {"sites": {}})


def test_score_weighted_from_config() -> None:
    cfg = make_config(strategy={"name": "score-weighted", "options": {"times_samples": True, "min_score": 0.2}})
    assert strategy_for(cfg) is ScoreWeightedFedAvg
    with pytest.raises(ConfigError, match="only add ciphertexts"):
        strategy_for(make_config(strategy={"name": "score-weighted"}, privacy={"dp": "off", "encryption": "ckks"}))
