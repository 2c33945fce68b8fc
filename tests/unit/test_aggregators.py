from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from strategies.aggregators import (
    AGGREGATORS,
    attention_from_scores,
    attention_step,
    attention_weights,
    check_updates,
    coordinate_median,
    fedatt,
    get_aggregator,
    krum,
    krum_select,
    layer_distances,
    majority_vote,
    soft_vote,
    soft_vote_labels,
    trimmed_mean,
    weighted_average,
)

LN3 = math.log(3.0)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# --------------------------------------------------------------------------- FedAtt


def _two_sites() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    server = {"w": np.array([0.0]), "v": np.array([0.0, 0.0])}
    updates = [
        {"w": np.array([LN3]), "v": np.array([3.0, 4.0])},
        {"w": np.array([0.0]), "v": np.array([-3.0, -4.0])},
    ]
    return server, updates


def test_layer_distances_hand_computed() -> None:
    server, updates = _two_sites()
    # w: |0 - ln 3| = ln 3; v: ||(0,0) - (3,4)|| = 5
    assert layer_distances(server=server, update=updates[0]) == pytest.approx({"w": LN3, "v": 5.0})
    # w: 0; v: ||(3,4)|| = 5
    assert layer_distances(server=server, update=updates[1]) == pytest.approx({"w": 0.0, "v": 5.0})


def test_layer_distance_is_the_frobenius_norm_of_a_matrix() -> None:
    d = layer_distances(server={"m": np.zeros((2, 2))}, update={"m": np.array([[1.0, 0.0], [0.0, 2.0]])})
    # Frobenius: sqrt(1 + 4) = sqrt(5); spectral would be 2
    assert d["m"] == pytest.approx(math.sqrt(5.0))


def test_attention_weights_hand_computed() -> None:
    server, updates = _two_sites()
    alpha = attention_weights(server=server, updates=updates)
    # w: softmax(ln 3, 0) = (3, 1) / 4
    np.testing.assert_allclose(alpha["w"], [0.75, 0.25])
    # v: both sites are 5 away: softmax(5, 5) = (1/2, 1/2)
    np.testing.assert_allclose(alpha["v"], [0.5, 0.5])


def test_attention_weights_match_the_fedatt_formula() -> None:
    rng = np.random.default_rng(0)
    server = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
    updates = [{k: v + rng.normal(scale=0.5, size=v.shape) for k, v in server.items()} for _ in range(4)]
    alpha = attention_weights(server=server, updates=updates)
    for key in server:
        s = np.array([np.sqrt(((server[key] - u[key]) ** 2).sum()) for u in updates])
        np.testing.assert_allclose(alpha[key], np.exp(s) / np.exp(s).sum())
        assert alpha[key].sum() == pytest.approx(1.0)


def test_fedatt_hand_computed() -> None:
    server, updates = _two_sites()
    out = fedatt(server=server, updates=updates, step_size=0.5)
    # w: 0 - 0.5 * (3/4 * (0 - ln 3) + 1/4 * (0 - 0)) = 0.375 ln 3
    np.testing.assert_allclose(out["w"], [0.375 * LN3])
    # v: 0 - 0.5 * (1/2 * (0 - (3,4)) + 1/2 * (0 - (-3,-4))) = (0, 0)
    np.testing.assert_allclose(out["v"], [0.0, 0.0], atol=1e-15)


def test_fedatt_with_unit_step_is_the_attention_weighted_average() -> None:
    server, updates = _two_sites()
    out = fedatt(server=server, updates=updates, step_size=1.0)
    # w: 3/4 * ln 3 + 1/4 * 0
    np.testing.assert_allclose(out["w"], [0.75 * LN3])


def test_fedatt_returns_the_dtype_of_the_first_update() -> None:
    out = fedatt(server={"w": np.zeros(2)}, updates=[{"w": f32(1, 2)}, {"w": f32(3, 4)}], step_size=1.0)
    assert out["w"].dtype == np.float32


def test_fedatt_noise_is_reproducible_and_added_per_coordinate() -> None:
    server, updates = _two_sites()
    clean = fedatt(server=server, updates=updates, step_size=0.5)
    a = fedatt(server=server, updates=updates, step_size=0.5, noise_std=0.1, rng=np.random.default_rng(7))
    b = fedatt(server=server, updates=updates, step_size=0.5, noise_std=0.1, rng=np.random.default_rng(7))
    ref = np.random.default_rng(7)
    for key in ("w", "v"):  # the noise is drawn layer by layer, in the order of the update's keys
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_allclose(a[key], clean[key] + 0.1 * ref.standard_normal(clean[key].shape))


def test_fedatt_noise_has_the_requested_standard_deviation() -> None:
    server = {"w": np.zeros(20_000)}
    out = fedatt(
        server=server, updates=[{"w": np.zeros(20_000)}], step_size=1.0, noise_std=0.3, rng=np.random.default_rng(1)
    )
    assert np.std(out["w"]) == pytest.approx(0.3, rel=0.03)
    assert abs(np.mean(out["w"])) < 0.3 * 4 / math.sqrt(20_000)


def test_attention_from_scores_hand_computed() -> None:
    alpha = attention_from_scores(scores=[{"w": 0.0, "v": 2.0}, {"w": LN3, "v": 2.0}])
    # w: softmax(0, ln 3) = (1/4, 3/4); v: equal scores, equal weights
    assert alpha[0] == pytest.approx({"w": 0.25, "v": 0.5})
    assert alpha[1] == pytest.approx({"w": 0.75, "v": 0.5})


def test_attention_from_scores_is_stable_for_large_distances() -> None:
    alpha = attention_from_scores(scores=[{"w": 1000.0}, {"w": 0.0}])
    assert alpha[0]["w"] == pytest.approx(1.0)
    assert alpha[1]["w"] == pytest.approx(0.0, abs=1e-300)


def _score_only_protocol(
    server: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], step_size: float
) -> dict[str, Any]:
    """The encrypted FedAtt protocol, with plain numpy in place of CKKS."""
    # (1) each site computes its own per-layer distances; (2) it sends only these scalars
    scores = [layer_distances(server=server, update=u) for u in updates]
    # (3) the server turns them into per-site, per-layer weights
    alphas = attention_from_scores(scores=scores)
    # (4) each site scales its layers by its weights ("then encrypts"); the server adds them up
    scaled = [{k: alphas[i][k] * u[k].astype(np.float64) for k in u} for i, u in enumerate(updates)]
    combined = {k: np.sum([s[k] for s in scaled], axis=0) for k in server}
    # (5) the sites "decrypt" the sum and take the step
    return attention_step(server=server, combined=combined, step_size=step_size)


def test_score_only_protocol_equals_plaintext_fedatt() -> None:
    rng = np.random.default_rng(3)
    server = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    updates = [{k: v + rng.normal(scale=s, size=v.shape) for k, v in server.items()} for s in (0.1, 0.5, 2.0)]
    plain = fedatt(server=server, updates=updates, step_size=0.7)
    protocol = _score_only_protocol(server, updates, 0.7)
    for key in server:
        np.testing.assert_allclose(protocol[key], plain[key], rtol=1e-12, atol=1e-12)


def test_attention_step_hand_computed() -> None:
    # (1, 2) - 0.25 * ((1, 2) - (5, 6)) = (2, 3)
    out = attention_step(server={"w": np.array([1.0, 2.0])}, combined={"w": np.array([5.0, 6.0])}, step_size=0.25)
    np.testing.assert_allclose(out["w"], [2.0, 3.0])
    # the model keeps its dtype though the decrypted sum is float64
    out32 = attention_step(server={"w": f32(1, 2)}, combined={"w": np.array([5.0, 6.0])}, step_size=0.25)
    assert out32["w"].dtype == np.float32


# ------------------------------------------------------------------- median, trimmed mean


def test_coordinate_median_ignores_an_outlier_the_mean_follows() -> None:
    updates = [{"w": f32(1, 10)}, {"w": f32(2, 20)}, {"w": f32(100, -1000)}]
    # per coordinate: median(1, 2, 100) = 2, median(10, 20, -1000) = 10
    assert coordinate_median(updates)["w"].tolist() == [2.0, 10.0]
    # the mean follows the outlier: (1 + 2 + 100) / 3 = 34.33...
    assert weighted_average(updates, [1, 1, 1])["w"][0] == pytest.approx(103 / 3)
    assert coordinate_median(updates)["w"].dtype == np.float32


def test_coordinate_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    updates = [{"w": np.array([[v]])} for v in (1.0, 2.0, 3.0, 100.0)]
    # (2 + 3) / 2
    assert coordinate_median(updates)["w"].tolist() == [[2.5]]


def test_trimmed_mean_drops_the_extremes() -> None:
    updates = [{"w": f32(v, -v)} for v in (1, 2, 3, 4, 100)]
    # beta = 0.2 of 5 sites: drop floor(1.0) = 1 value at each end: mean(2, 3, 4) = 3
    assert trimmed_mean(updates, beta=0.2)["w"].tolist() == [3.0, -3.0]
    # beta = 0.1: floor(0.5) = 0 dropped, the plain mean (1 + 2 + 3 + 4 + 100) / 5 = 22
    assert trimmed_mean(updates, beta=0.1)["w"].tolist() == [22.0, -22.0]
    assert trimmed_mean(updates, beta=0.2)["w"].dtype == np.float32


def test_trimmed_mean_with_beta_zero_is_the_mean() -> None:
    updates = [{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 6.0])}]
    assert trimmed_mean(updates, beta=0.0)["w"].tolist() == [2.0, 4.0]


# --------------------------------------------------------------------------------- Krum

# Squared distances among the honest updates (0,0), (1,0), (0,2), (2,2):
#   d(0,1)=1  d(0,2)=4  d(0,3)=8  d(1,2)=5  d(1,3)=5  d(2,3)=4; the outlier (100,100) is ~2e4 from all.
# n=5, f=1: each update is scored by its n-f-2 = 2 nearest neighbours:
#   u0: 1+4=5   u1: 1+5=6   u2: 4+4=8   u3: 4+5=9   u4: ~4e4
KRUM_UPDATES = [{"w": f32(*xy)} for xy in ((0, 0), (1, 0), (0, 2), (2, 2), (100, 100))]


def test_krum_picks_the_honest_update_closest_to_its_neighbours() -> None:
    assert krum_select(KRUM_UPDATES, num_malicious=1) == [0]
    assert krum(KRUM_UPDATES, num_malicious=1)["w"].tolist() == [0.0, 0.0]
    # the mean is dragged to (20.6, 20.8)
    np.testing.assert_allclose(weighted_average(KRUM_UPDATES, [1] * 5)["w"], [20.6, 20.8], rtol=1e-6)


def test_multi_krum_averages_the_best_scored() -> None:
    assert krum_select(KRUM_UPDATES, num_malicious=1, num_to_keep=3) == [0, 1, 2]
    # ((0,0) + (1,0) + (0,2)) / 3
    np.testing.assert_allclose(krum(KRUM_UPDATES, num_malicious=1, num_to_keep=3)["w"], [1 / 3, 2 / 3], rtol=1e-6)
    # weighted by sample counts 1 and 3: (1*(0,0) + 3*(1,0)) / 4
    out = krum(KRUM_UPDATES, num_malicious=1, num_to_keep=2, weights=[1, 3, 1, 1, 1])
    assert out["w"].tolist() == [0.75, 0.0]
    assert out["w"].dtype == np.float32


def test_krum_scores_whole_models() -> None:
    # per layer, update 2 is the outlier in "a" and update 3 in "b"; over the whole model
    # updates 0 and 1 are the only ones near everything else
    updates = [
        {"a": np.array([0.0]), "b": np.array([0.0])},
        {"a": np.array([0.1]), "b": np.array([0.1])},
        {"a": np.array([50.0]), "b": np.array([0.0])},
        {"a": np.array([0.0]), "b": np.array([50.0])},
    ]
    assert set(krum_select(updates, num_malicious=0, num_to_keep=2)) == {0, 1}


# ------------------------------------------------------------------------------- voting


def test_majority_vote_hand_computed() -> None:
    preds = [np.array([0, 1, 2]), np.array([0, 2, 2]), np.array([1, 1, 0])]
    # sample 0: {0: 2, 1: 1} -> 0; sample 1: {1: 2, 2: 1} -> 1; sample 2: {2: 2, 0: 1} -> 2
    assert majority_vote(predictions=preds).tolist() == [0, 1, 2]
    # weights (1, 1, 3): sample 0: {0: 2, 1: 3} -> 1; sample 1: {1: 4, 2: 1} -> 1; sample 2: {2: 2, 0: 3} -> 0
    assert majority_vote(predictions=preds, weights=[1, 1, 3]).tolist() == [1, 1, 0]


def test_majority_vote_ties_go_to_the_smallest_class() -> None:
    # sample 0: 0 vs 1; sample 1: 2 vs 1 -> both ties
    assert majority_vote(predictions=[np.array([0, 2]), np.array([1, 1])]).tolist() == [0, 1]
    # 0.1 + 0.2 = 0.30000000000000004 for class 2 vs 0.3 for class 1: a tie, not a win for 2
    preds = [np.array([2]), np.array([2]), np.array([1])]
    assert majority_vote(predictions=preds, weights=[0.1, 0.2, 0.3]).tolist() == [1]


def test_majority_vote_with_num_classes_and_no_samples() -> None:
    assert majority_vote(predictions=[np.array([3]), np.array([3])], num_classes=5).tolist() == [3]
    assert majority_vote(predictions=[np.array([], dtype=np.int64)]).tolist() == []


def test_soft_vote_hand_computed() -> None:
    a = np.array([[0.6, 0.4], [0.2, 0.8]])
    b = np.array([[0.2, 0.8], [0.6, 0.4]])
    # equal weights: row 0 (0.4, 0.6), row 1 (0.4, 0.6)
    np.testing.assert_allclose(soft_vote(probabilities=[a, b]), [[0.4, 0.6], [0.4, 0.6]])
    # weights (3, 1): row 0 ((1.8 + 0.2) / 4, (1.2 + 0.8) / 4) = (0.5, 0.5); row 1 (0.3, 0.7)
    np.testing.assert_allclose(soft_vote(probabilities=[a, b], weights=[3, 1]), [[0.5, 0.5], [0.3, 0.7]])
    # row 0 is a tie -> class 0; row 1 -> class 1
    assert soft_vote_labels(probabilities=[a, b], weights=[3, 1]).tolist() == [0, 1]
    assert soft_vote_labels(probabilities=[a, b]).tolist() == [1, 1]


def test_soft_vote_accepts_float32_rows_that_sum_to_one_up_to_rounding() -> None:
    p = np.array([[0.1, 0.2, 0.7]], dtype=np.float32)
    np.testing.assert_allclose(soft_vote(probabilities=[p]), p, rtol=1e-6)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_uniform_call() -> None:
    assert set(AGGREGATORS) == {"mean", "median", "trimmed-mean", "krum", "attention"}
    updates = [{"w": np.array([float(v)])} for v in (1, 2, 3, 4, 100)]
    calls: dict[str, dict[str, Any]] = {
        "mean": {"weights": [1] * 5},
        "median": {},
        "trimmed-mean": {"beta": 0.2},
        "krum": {"num_malicious": 1},
        "attention": {"server": {"w": np.array([0.0])}, "step_size": 1.0},
    }
    results = {name: get_aggregator(name)(updates=updates, **kw)["w"].tolist() for name, kw in calls.items()}
    assert results["mean"] == [22.0]
    assert results["median"] == [3.0]
    assert results["trimmed-mean"] == [3.0]
    # scores with n-f-2 = 2 neighbours: 1 -> 1+4=5, 2 -> 1+1=2, 3 -> 1+1=2, 4 -> 1+4=5: 2 and 3 tie
    assert results["krum"] in ([2.0], [3.0])
    # the outlier is farthest from the server, so FedAtt gives it almost all the weight (as the paper does)
    assert results["attention"][0] == pytest.approx(100.0, rel=1e-3)


def test_get_aggregator_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown aggregator 'avg'.*'attention', 'krum', 'mean'"):
        get_aggregator("avg")


# --------------------------------------------------------------------------- bad inputs

_OK = {"w": np.array([1.0, 2.0])}
_BAD_INPUTS: list[tuple[str, Any, dict[str, Any], str]] = [
    ("median-empty", coordinate_median, {"updates": []}, "at least one update"),
    ("median-keys", coordinate_median, {"updates": [_OK, {"x": np.zeros(2)}]}, r"update 1 has mismatched keys"),
    ("median-shape", coordinate_median, {"updates": [_OK, {"w": np.zeros(3)}]}, r"update 1 has shape \(3,\)"),
    ("median-nan", coordinate_median, {"updates": [_OK, {"w": np.array([1.0, np.nan])}]}, "non-finite"),
    ("median-inf", coordinate_median, {"updates": [_OK, {"w": np.array([np.inf, 1.0])}]}, "non-finite"),
    ("median-str", coordinate_median, {"updates": [{"w": np.array(["a"])}]}, "non-numeric"),
    ("median-not-mapping", coordinate_median, {"updates": [np.zeros(2)]}, "not a mapping"),
    ("median-no-arrays", coordinate_median, {"updates": [{}]}, "holds no arrays"),
    ("trim-beta-high", trimmed_mean, {"updates": [_OK], "beta": 0.5}, r"beta must be a fraction in \[0, 0.5\)"),
    ("trim-beta-neg", trimmed_mean, {"updates": [_OK], "beta": -0.1}, "beta must be"),
    ("trim-beta-nan", trimmed_mean, {"updates": [_OK], "beta": float("nan")}, "beta must be"),
    ("trim-empty", trimmed_mean, {"updates": [], "beta": 0.1}, "at least one update"),
    ("krum-too-few", krum, {"updates": [_OK] * 4, "num_malicious": 1}, r"more than 2\*num_malicious \+ 2 = 4"),
    ("krum-neg-f", krum, {"updates": [_OK] * 4, "num_malicious": -1}, "non-negative"),
    ("krum-float-f", krum, {"updates": [_OK] * 4, "num_malicious": 0.5}, "must be an integer"),
    ("krum-keep-0", krum, {"updates": [_OK] * 5, "num_malicious": 1, "num_to_keep": 0}, "num_to_keep must be"),
    ("krum-keep-many", krum, {"updates": [_OK] * 5, "num_malicious": 1, "num_to_keep": 5}, r"n - num_malicious = 4"),
    ("krum-weights-len", krum, {"updates": [_OK] * 3, "num_malicious": 0, "weights": [1]}, "3 updates but 1 weights"),
    ("krum-weights-neg", krum, {"updates": [_OK] * 3, "num_malicious": 0, "weights": [1, -1, 1]}, "non-negative"),
    ("krum-nan", krum, {"updates": [_OK, _OK, {"w": np.array([np.nan, 0])}], "num_malicious": 0}, "non-finite"),
    ("att-empty", fedatt, {"server": _OK, "updates": [], "step_size": 1.0}, "at least one update"),
    ("att-step-0", fedatt, {"server": _OK, "updates": [_OK], "step_size": 0.0}, "step_size must be"),
    ("att-step-nan", fedatt, {"server": _OK, "updates": [_OK], "step_size": float("nan")}, "step_size must be"),
    ("att-noise-neg", fedatt, {"server": _OK, "updates": [_OK], "step_size": 1.0, "noise_std": -1.0}, "noise_std"),
    (
        "att-server-keys",
        fedatt,
        {"server": {"x": np.zeros(2)}, "updates": [_OK], "step_size": 1.0},
        r"server parameters first.*update 1 has mismatched keys",
    ),
    (
        "att-server-shape",
        attention_weights,
        {"server": {"w": np.zeros((2, 1))}, "updates": [_OK]},
        r"server parameters first.*shape",
    ),
    ("att-server-nan", attention_weights, {"server": {"w": np.array([np.nan, 0])}, "updates": [_OK]}, "non-finite"),
    ("scores-empty", attention_from_scores, {"scores": []}, "at least one site"),
    ("scores-no-layer", attention_from_scores, {"scores": [{}]}, "no layer"),
    ("scores-keys", attention_from_scores, {"scores": [{"w": 1.0}, {"v": 1.0}]}, "site 1 has mismatched keys"),
    ("scores-neg", attention_from_scores, {"scores": [{"w": -1.0}]}, "non-negative distance"),
    ("scores-nan", attention_from_scores, {"scores": [{"w": float("nan")}]}, "finite non-negative"),
    ("scores-str", attention_from_scores, {"scores": [{"w": "1"}]}, "not a number"),
    ("vote-empty", majority_vote, {"predictions": []}, "at least one model"),
    ("vote-2d", majority_vote, {"predictions": [np.zeros((2, 2), dtype=int)]}, "must be 1-D"),
    ("vote-float", majority_vote, {"predictions": [np.array([0.0, 1.0])]}, "integer class indices"),
    ("vote-length", majority_vote, {"predictions": [np.array([0, 1]), np.array([0])]}, "model 1 predicts 1 samples"),
    ("vote-negative", majority_vote, {"predictions": [np.array([0, -1])]}, "negative class index"),
    ("vote-num-classes", majority_vote, {"predictions": [np.array([0, 5])], "num_classes": 5}, "not below"),
    ("vote-weights-len", majority_vote, {"predictions": [np.array([0])], "weights": [1, 2]}, "1 models but 2"),
    ("vote-weights-zero", majority_vote, {"predictions": [np.array([0])], "weights": [0]}, "sum to zero"),
    ("vote-weights-inf", majority_vote, {"predictions": [np.array([0])], "weights": [math.inf]}, "finite"),
    ("soft-empty", soft_vote, {"probabilities": []}, "at least one model"),
    ("soft-1d", soft_vote, {"probabilities": [np.array([0.5, 0.5])]}, r"shape \(samples, classes\)"),
    ("soft-shape", soft_vote, {"probabilities": [np.eye(2), np.eye(3)]}, r"model 1 has shape \(3, 3\)"),
    ("soft-sum", soft_vote, {"probabilities": [np.array([[0.5, 0.6]])]}, "not a probability distribution"),
    ("soft-negative", soft_vote, {"probabilities": [np.array([[1.5, -0.5]])]}, "negative values"),
    ("soft-nan", soft_vote, {"probabilities": [np.array([[np.nan, 1.0]])]}, "non-finite"),
    ("soft-int", soft_vote, {"probabilities": [np.eye(2, dtype=int)]}, "floating point"),
    ("soft-labels-weights", soft_vote_labels, {"probabilities": [np.eye(2)], "weights": [-1]}, "non-negative"),
]


@pytest.mark.parametrize(("fn", "kwargs", "match"), [c[1:] for c in _BAD_INPUTS], ids=[c[0] for c in _BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_problem(fn: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)


# ----------------------------------------------------------------------- property tests

_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def _site_updates(draw: st.DrawFn, min_sites: int = 1) -> list[dict[str, np.ndarray]]:
    n = draw(st.integers(min_sites, 7))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
    return [{"w": draw(hnp.arrays(np.float64, shape, elements=_finite))} for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(_site_updates())
def test_median_and_trimmed_mean_lie_within_the_coordinate_range(updates: list[dict[str, np.ndarray]]) -> None:
    stacked = np.stack([u["w"] for u in updates])
    lo, hi = stacked.min(axis=0), stacked.max(axis=0)
    for out in (coordinate_median(updates)["w"], trimmed_mean(updates, beta=0.25)["w"]):
        assert out.shape == lo.shape
        tol = 1e-9 * np.maximum(np.abs(lo), np.abs(hi))
        assert np.all(out >= lo - tol) and np.all(out <= hi + tol)


@settings(max_examples=60, deadline=None)
@given(_site_updates(), st.integers(0, 2**16))
def test_attention_weights_are_a_distribution_and_identical_updates_come_back(
    updates: list[dict[str, np.ndarray]], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    server = {"w": updates[0]["w"] + rng.normal(size=updates[0]["w"].shape)}
    alpha = attention_weights(server=server, updates=updates)["w"]
    assert alpha.shape == (len(updates),)
    assert np.all(alpha >= 0) and alpha.sum() == pytest.approx(1.0)
    same = [{"w": updates[0]["w"].copy()} for _ in updates]
    np.testing.assert_allclose(
        fedatt(server=server, updates=same, step_size=1.0)["w"], updates[0]["w"], rtol=1e-9, atol=1e-6
    )


@settings(max_examples=40, deadline=None)
@given(_site_updates(), st.floats(0.01, 2.0))
def test_score_only_protocol_equals_fedatt_property(updates: list[dict[str, np.ndarray]], step: float) -> None:
    server = {"w": np.zeros_like(updates[0]["w"])}
    plain = fedatt(server=server, updates=updates, step_size=step)["w"]
    protocol = _score_only_protocol(server, updates, step)["w"]
    np.testing.assert_allclose(protocol, plain, rtol=1e-9, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=3, max_size=3), min_size=1, max_size=5))
def test_majority_vote_picks_a_class_with_the_most_votes(rows: list[list[int]]) -> None:
    preds = [np.array(r) for r in rows]
    winners = majority_vote(predictions=preds)
    for j, c in enumerate(winners):
        votes = [r[j] for r in rows]
        assert votes.count(int(c)) == max(votes.count(k) for k in set(votes))


def test_check_updates_returns_the_layer_names_in_order() -> None:
    assert check_updates([{"b": np.zeros(1), "a": np.zeros(2)}]) == ["b", "a"]
