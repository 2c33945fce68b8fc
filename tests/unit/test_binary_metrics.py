"""Federated binary metrics: hand-computed counts, merges, AUC and the wire form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from torch import nn

from dmsc_fed.errors import ModelError
from dmsc_fed.metrics import (
    MAX_BINS,
    BinaryCounts,
    binary_counts,
    binary_scores,
    from_metric_lists,
    histogram_auc,
    merge_counts,
    to_metric_lists,
)
from dmsc_fed.training import evaluate, predict_scores

LABELS = np.array([1, 1, 0, 0, 0])
SCORES = np.array([0.9, 0.55, 0.6, 0.2, 0.05])


def test_hand_computed_counts_and_scores() -> None:
    c = binary_counts(labels=LABELS, scores=SCORES, bins=10)
    # predicted positive (score > 0.5): 0.9, 0.55 (both frauds) and 0.6 (legit)
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 1, 2, 0)
    assert c.pos_hist == (0, 0, 0, 0, 0, 1, 0, 0, 0, 1)
    assert c.neg_hist == (1, 0, 1, 0, 0, 0, 1, 0, 0, 0)
    s = binary_scores(c)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == 1.0
    assert s["f1"] == pytest.approx(0.8)  # 2 * (2/3) * 1 / (2/3 + 1)
    assert s["specificity"] == pytest.approx(2 / 3)
    assert s["accuracy"] == pytest.approx(4 / 5)
    # pairs (pos, neg): 0.9 beats all three; 0.55 beats 0.2 and 0.05, not 0.6 -> 5 of 6
    assert s["auc"] == pytest.approx(5 / 6)
    assert s["auc"] == pytest.approx(roc_auc_score(LABELS, SCORES))


def test_threshold_moves_the_confusion_counts_not_the_histograms() -> None:
    c = binary_counts(labels=LABELS, scores=SCORES, threshold=0.7, bins=10)
    assert (c.tp, c.fp, c.tn, c.fn) == (1, 0, 3, 1)
    assert c.pos_hist == binary_counts(labels=LABELS, scores=SCORES, bins=10).pos_hist
    assert binary_scores(c)["precision"] == 1.0 and binary_scores(c)["recall"] == 0.5


def test_score_at_threshold_is_negative_like_argmax_and_edges_bin_inward() -> None:
    c = binary_counts(labels=np.array([1, 0, 1]), scores=np.array([0.5, 0.0, 1.0]), bins=4)
    assert (c.tp, c.fn, c.tn, c.fp) == (1, 1, 1, 0)  # 0.5 is not above 0.5
    assert c.pos_hist == (0, 0, 1, 1) and c.neg_hist == (1, 0, 0, 0)  # 1.0 falls in the last bin


def test_pairs_in_one_bin_count_half() -> None:
    labels, scores = np.array([1, 0]), np.array([0.51, 0.55])
    assert binary_scores(binary_counts(labels=labels, scores=scores, bins=10))["auc"] == 0.5
    assert binary_scores(binary_counts(labels=labels, scores=scores, bins=100))["auc"] == 0.0
    assert histogram_auc(pos_hist=(0, 2), neg_hist=(2, 0)) == 1.0
    assert histogram_auc(pos_hist=(1, 2), neg_hist=(2, 0)) == pytest.approx(5 / 6)  # (2 * 0.5 + 2 * 2) / 6
    assert histogram_auc(pos_hist=(1, 1), neg_hist=(1, 1)) == 0.5  # (0.5 + 0 + 1 + 0.5) / 4


def test_undefined_cases() -> None:
    only_negatives = binary_scores(binary_counts(labels=np.array([0, 0]), scores=np.array([0.1, 0.7])))
    assert only_negatives["auc"] is None and only_negatives["recall"] == 0.0
    assert only_negatives["precision"] == 0.0 and only_negatives["accuracy"] == 0.5
    nothing_flagged = binary_scores(binary_counts(labels=np.array([1, 0]), scores=np.array([0.3, 0.1])))
    assert nothing_flagged["precision"] == 0.0 and nothing_flagged["f1"] == 0.0 and nothing_flagged["auc"] == 1.0
    only_positives = binary_scores(binary_counts(labels=np.array([1]), scores=np.array([0.9])))
    assert only_positives["auc"] is None and only_positives["specificity"] == 0.0
    empty = binary_counts(labels=np.array([], dtype=int), scores=np.array([]), bins=3)
    assert empty.total == 0 and empty.pos_hist == (0, 0, 0)
    with pytest.raises(ValueError, match="no samples"):
        binary_scores(empty)


def test_two_sites_merge_to_the_pooled_counts() -> None:
    a = binary_counts(labels=LABELS[:2], scores=SCORES[:2], bins=10)
    b = binary_counts(labels=LABELS[2:], scores=SCORES[2:], bins=10)
    assert binary_scores(a)["auc"] is None and binary_scores(b)["auc"] is None  # neither site alone has an AUC
    assert merge_counts([a, b]) == binary_counts(labels=LABELS, scores=SCORES, bins=10)
    assert binary_scores(merge_counts([a, b]))["auc"] == pytest.approx(5 / 6)


def test_merge_needs_counts_with_the_same_bins() -> None:
    with pytest.raises(ValueError, match="at least one"):
        merge_counts([])
    with pytest.raises(ValueError, match="different numbers of bins"):
        merge_counts(
            [binary_counts(labels=LABELS, scores=SCORES, bins=10), binary_counts(labels=LABELS, scores=SCORES)]
        )


@st.composite
def _sites(draw: st.DrawFn) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    bins = draw(st.integers(1, 50))
    n_sites = draw(st.integers(1, 4))
    labels, scores = [], []
    for _ in range(n_sites):
        n = draw(st.integers(0, 30))
        labels.append(np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.int64))
        unit = st.floats(0.0, 1.0, allow_nan=False)
        scores.append(np.array(draw(st.lists(unit, min_size=n, max_size=n)), dtype=np.float64))
    return labels, scores, bins


@settings(max_examples=80, deadline=None)
@given(_sites(), st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]))
def test_merging_sites_equals_counting_pooled_data(sites, threshold: float) -> None:
    labels, scores, bins = sites
    parts = [
        binary_counts(labels=y, scores=s, threshold=threshold, bins=bins) for y, s in zip(labels, scores, strict=True)
    ]
    pooled = binary_counts(labels=np.concatenate(labels), scores=np.concatenate(scores), threshold=threshold, bins=bins)
    assert merge_counts(parts) == pooled
    if pooled.total:
        assert binary_scores(merge_counts(parts)) == binary_scores(pooled)


@settings(max_examples=80, deadline=None)
@given(_sites())
def test_histogram_auc_is_the_auc_of_the_bin_indices(sites) -> None:
    labels, scores, bins = sites
    y, s = np.concatenate(labels), np.concatenate(scores)
    auc = binary_scores(binary_counts(labels=y, scores=s, bins=bins))["auc"] if y.size else None
    if y.size and 0 < y.sum() < y.size:
        index = np.minimum(np.floor(s * bins), bins - 1)
        assert auc == pytest.approx(roc_auc_score(y, index), abs=1e-12)
    else:
        assert auc is None


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 200), st.data())
def test_histogram_auc_equals_sklearn_when_no_two_scores_share_a_bin(bins: int, data) -> None:
    cells = data.draw(st.lists(st.integers(0, bins - 1), min_size=2, max_size=40, unique=True))
    y = np.array(data.draw(st.lists(st.integers(0, 1), min_size=len(cells), max_size=len(cells))))
    s = (np.array(cells) + 0.5) / bins  # one score in the middle of each chosen bin
    auc = binary_scores(binary_counts(labels=y, scores=s, bins=bins))["auc"]
    if 0 < y.sum() < y.size:
        assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    else:
        assert auc is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"labels": [0, 2], "scores": [0.1, 0.2]}, "labels must be 0 or 1"),
        ({"labels": [0, 1], "scores": [0.1, 1.1]}, r"in \[0, 1\]"),
        ({"labels": [0, 1], "scores": [0.1, -0.01]}, r"in \[0, 1\]"),
        ({"labels": [0, 1], "scores": [0.1, float("nan")]}, "finite"),
        ({"labels": [0, 1], "scores": [0.1]}, "2 labels but 1 scores"),
        ({"labels": [[0, 1]], "scores": [[0.1, 0.2]]}, "one-dimensional"),
        ({"labels": [0], "scores": [0.1], "bins": 0}, "bins must be"),
        ({"labels": [0], "scores": [0.1], "bins": MAX_BINS + 1}, "bins must be"),
        ({"labels": [0], "scores": [0.1], "bins": 2.0}, "bins must be"),
        ({"labels": [0], "scores": [0.1], "threshold": 1.5}, "threshold must be"),
        ({"labels": [0], "scores": [0.1], "threshold": float("nan")}, "threshold must be"),
    ],
)
def test_binary_counts_rejects_bad_input(kwargs, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        binary_counts(**kwargs)


def test_wire_roundtrip_through_a_metric_record() -> None:
    c = binary_counts(labels=LABELS, scores=SCORES, bins=10)
    lists = to_metric_lists(c)
    assert lists == {
        "bin-counts": [2, 1, 2, 0],
        "pos-hist": [0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
        "neg-hist": [1, 0, 1, 0, 0, 0, 1, 0, 0, 0],
    }
    record = MetricRecord({**lists, "accuracy": 0.8, "num-examples": 5})
    assert from_metric_lists(record) == c


GOOD = {"bin-counts": [1, 1, 1, 1], "pos-hist": [1, 1], "neg-hist": [2, 0]}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"bin-counts": None}, "missing key 'bin-counts'"),
        ({"pos-hist": None}, "missing key 'pos-hist'"),
        ({"bin-counts": [1, 1, 1]}, r"must be \[tp, fp, tn, fn\], got 3 entries"),
        ({"bin-counts": [1, -1, 1, 1]}, r"'bin-counts'\[1\] must be a non-negative integer"),
        ({"bin-counts": [1, 1.0, 1, 1]}, r"'bin-counts'\[1\] must be a non-negative integer"),
        ({"bin-counts": [True, 1, 1, 1]}, r"'bin-counts'\[0\] must be a non-negative integer"),
        ({"bin-counts": [2**63, 1, 1, 1]}, r"'bin-counts'\[0\] must be a non-negative integer"),
        ({"pos-hist": 2}, "'pos-hist' must be a list of integers, got int"),
        ({"neg-hist": [1.5, 0.5]}, r"'neg-hist'\[0\] must be a non-negative integer"),
        ({"neg-hist": [2]}, "pos_hist has 2 bins but neg_hist has 1"),
        ({"pos-hist": [], "neg-hist": []}, "must have 1 to"),
        ({"pos-hist": [0] * (MAX_BINS + 1), "neg-hist": [0] * (MAX_BINS + 1)}, "must have 1 to"),
        ({"pos-hist": [1, 2]}, r"pos_hist counts 3 positives but tp \+ fn = 2"),
        ({"neg-hist": [1, 0]}, r"neg_hist counts 1 negatives but fp \+ tn = 2"),
    ],
)
def test_from_metric_lists_rejects_bad_lists(change: dict[str, object], needle: str) -> None:
    metrics = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=needle):
        from_metric_lists(metrics)


def test_counts_validate_themselves() -> None:
    assert from_metric_lists(GOOD) == BinaryCounts(tp=1, fp=1, tn=1, fn=1, pos_hist=(1, 1), neg_hist=(2, 0))
    with pytest.raises(ValueError, match="tp must be a non-negative integer"):
        BinaryCounts(tp=-1, fp=0, tn=0, fn=1, pos_hist=(0,), neg_hist=(0,))
    numpy_ints = BinaryCounts(tp=np.int64(1), fp=0, tn=0, fn=0, pos_hist=(np.int64(1),), neg_hist=(0,))  # type: ignore[arg-type]
    assert type(numpy_ints.tp) is int and type(numpy_ints.pos_hist[0]) is int


def _two_class_model() -> nn.Module:
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [1.0]]))
        model.bias.zero_()
    return model


def test_predict_scores_is_the_softmax_of_class_one_and_agrees_with_evaluate() -> None:
    x = np.array([[-2.0], [0.0], [0.5], [3.0]], dtype=np.float32)
    y = np.array([0, 1, 1, 0])
    model, cpu = _two_class_model(), torch.device("cpu")
    scores = predict_scores(model=model, x=x, device=cpu)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-x[:, 0].astype(np.float64))), rtol=1e-7)
    counts = binary_counts(labels=y, scores=scores)
    assert (counts.tp, counts.fp, counts.tn, counts.fn) == (1, 1, 1, 1)  # logit 0 -> score 0.5 -> negative
    accuracy = evaluate(model=model, x=x, y=y.astype(np.int64), device=cpu).accuracy
    assert binary_scores(counts)["accuracy"] == pytest.approx(accuracy)


def test_predict_scores_needs_two_classes() -> None:
    with pytest.raises(ModelError, match="two-class model"):
        predict_scores(model=nn.Linear(1, 3), x=np.zeros((2, 1), dtype=np.float32), device=torch.device("cpu"))
