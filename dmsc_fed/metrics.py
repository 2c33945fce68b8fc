"""Federated binary-classification metrics, exact from what each site sends.

Precision, recall or ROC AUC of the federation cannot be averaged from the sites'
own figures (an average of per-site AUCs is not the AUC of the pooled test data).
Instead each site sends counts, and the server adds them up:

1. each site computes :class:`BinaryCounts` from its labels and predicted
   positive-class probabilities (:func:`binary_counts`): the confusion counts at
   a threshold, and histograms of the scores of its positives and negatives over
   equal bins of ``[0, 1]``;
2. the counts travel as integer lists in a Flower ``MetricRecord``
   (:func:`to_metric_lists`, :func:`from_metric_lists`, which validates them);
3. the server adds them (:func:`merge_counts`) and scores the sum
   (:func:`binary_scores`).

Since sums of counts are the counts of the pooled data, the merged scores are those
of the pooled test sets, exactly. The AUC is the Mann-Whitney statistic on binned
scores (Hanley and McNeil 1982, "The meaning and use of the area under a receiver
operating characteristic (ROC) curve"): the share of (positive, negative) pairs in
which the positive's bin is higher, a pair in the same bin counting one half. It
equals the AUC of the raw scores whenever no positive shares a bin with a negative;
otherwise it differs by at most half the share of (positive, negative) pairs that
share a bin.

Counts say how many samples fell where, never which ones; a site that must hide
even that can leave them out of its reply.

Example:
-------
>>> import numpy as np
>>> a = binary_counts(labels=np.array([1, 0]), scores=np.array([0.9, 0.2]))
>>> b = binary_counts(labels=np.array([1, 0]), scores=np.array([0.3, 0.6]))
>>> binary_scores(merge_counts([a, b]))["auc"]
0.75

"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_BINS = 100
"""Score bins of :func:`binary_counts` by default (AUC resolution 0.01 of the score)."""
MAX_BINS = 10_000
"""Most score bins accepted, which bounds the size of a site's reply."""
CONFUSION_KEY = "bin-counts"
"""MetricRecord key of the confusion counts ``[tp, fp, tn, fn]``."""
POS_HIST_KEY = "pos-hist"
"""MetricRecord key of the histogram of the positives' scores."""
NEG_HIST_KEY = "neg-hist"
"""MetricRecord key of the histogram of the negatives' scores."""
_INT64_MAX = 2**63 - 1  # a MetricRecord integer is a signed 64-bit integer on the wire


class BinaryScores(TypedDict):
    """The scores of :func:`binary_scores` (a plain dict at run time)."""

    precision: float
    recall: float
    f1: float
    specificity: float
    accuracy: float
    auc: float | None


def _is_count(value: object) -> bool:
    """Whether ``value`` is a non-negative integer that fits a MetricRecord (bool excluded)."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool | np.bool_):
        return False
    return 0 <= int(value) <= _INT64_MAX


@dataclass(frozen=True)
class BinaryCounts:
    """One site's (or a merge's) confusion counts and score histograms.

    Attributes
    ----------
    tp, fp, tn, fn
        True positives, false positives, true negatives, false negatives at the
        threshold the counts were computed with (a sample is predicted positive
        when its score is above the threshold).
    pos_hist
        ``pos_hist[i]``: positives whose score fell in bin ``i`` of ``bins``
        equal bins of ``[0, 1]``.
    neg_hist
        The same for the negatives.

    Raises
    ------
    ValueError
        A count is not a non-negative integer, the histograms are empty, longer
        than :data:`MAX_BINS` or of different lengths, or they do not add up to
        the positives ``tp + fn`` and the negatives ``fp + tn``.

    """

    tp: int
    fp: int
    tn: int
    fn: int
    pos_hist: tuple[int, ...]
    neg_hist: tuple[int, ...]

    def __post_init__(self) -> None:
        """Check the counts; store them as plain ints and tuples."""
        for name in ("tp", "fp", "tn", "fn"):
            value = getattr(self, name)
            if not _is_count(value):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("pos_hist", "neg_hist"):
            hist = tuple(getattr(self, name))
            if not 1 <= len(hist) <= MAX_BINS:
                raise ValueError(f"{name} must have 1 to {MAX_BINS} bins, has {len(hist)}")
            bad = next((i for i, v in enumerate(hist) if not _is_count(v)), None)
            if bad is not None:
                raise ValueError(f"{name}[{bad}] must be a non-negative integer, got {hist[bad]!r}")
            object.__setattr__(self, name, tuple(int(v) for v in hist))
        if len(self.pos_hist) != len(self.neg_hist):
            raise ValueError(f"pos_hist has {len(self.pos_hist)} bins but neg_hist has {len(self.neg_hist)}")
        if sum(self.pos_hist) != self.tp + self.fn:
            raise ValueError(f"pos_hist counts {sum(self.pos_hist)} positives but tp + fn = {self.tp + self.fn}")
        if sum(self.neg_hist) != self.fp + self.tn:
            raise ValueError(f"neg_hist counts {sum(self.neg_hist)} negatives but fp + tn = {self.fp + self.tn}")

    @property
    def bins(self) -> int:
        """Number of score bins."""
        return len(self.pos_hist)

    @property
    def positives(self) -> int:
        """Samples labelled positive (``tp + fn``)."""
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        """Samples labelled negative (``fp + tn``)."""
        return self.fp + self.tn

    @property
    def total(self) -> int:
        """All samples counted."""
        return self.positives + self.negatives


def binary_counts(
    *, labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5, bins: int = DEFAULT_BINS
) -> BinaryCounts:
    """Count one site's predictions: confusion counts at ``threshold`` and score histograms.

    Parameters
    ----------
    labels
        True labels, 0 (negative) or 1 (positive), one per sample.
    scores
        Predicted probability of the positive class, in ``[0, 1]``, one per sample
        (e.g. :func:`dmsc_fed.training.predict_scores`).
    threshold
        A sample is predicted positive when its score is strictly above
        ``threshold``, in ``[0, 1]``. At 0.5 this is the argmax of a two-class
        softmax (a tie goes to class 0), so the accuracy agrees with
        :func:`dmsc_fed.training.evaluate`.
    bins
        Number of equal bins of ``[0, 1]``: bin ``i`` holds the scores ``s`` with
        ``floor(s * bins) = i``, the last one also ``s = 1``. Every site of a
        federation must use the same ``bins`` and ``threshold``.

    Returns
    -------
    BinaryCounts
        The counts; empty inputs give all zeros.

    Raises
    ------
    ValueError
        ``labels`` or ``scores`` is not one-dimensional, their lengths differ, a
        label is not 0 or 1, a score is not finite or outside ``[0, 1]``, or
        ``threshold`` or ``bins`` is out of range.

    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be one-dimensional, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be an integer in [1, {MAX_BINS}], got {bins!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(np.unique(y).tolist())[:10]}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        raise ValueError(f"scores must lie in [0, 1], got values from {s.min()} to {s.max()}")
    pos = y == 1
    predicted = s > threshold
    index = np.minimum(np.floor(s * bins).astype(np.int64), bins - 1)
    return BinaryCounts(
        tp=int(np.sum(pos & predicted)),
        fp=int(np.sum(~pos & predicted)),
        tn=int(np.sum(~pos & ~predicted)),
        fn=int(np.sum(pos & ~predicted)),
        pos_hist=tuple(np.bincount(index[pos], minlength=bins).tolist()),
        neg_hist=tuple(np.bincount(index[~pos], minlength=bins).tolist()),
    )


def merge_counts(counts: Iterable[BinaryCounts]) -> BinaryCounts:
    """Add the counts of any number of sites: the counts of their pooled data.

    Parameters
    ----------
    counts
        One or more :class:`BinaryCounts`, all with the same number of bins.

    Returns
    -------
    BinaryCounts
        Their element-wise sum.

    Raises
    ------
    ValueError
        ``counts`` is empty, or the bins differ.

    """
    items = list(counts)
    if not items:
        raise ValueError("merge_counts needs at least one BinaryCounts")
    bins = {c.bins for c in items}
    if len(bins) > 1:
        raise ValueError(f"cannot merge counts with different numbers of bins: {sorted(bins)}")
    return BinaryCounts(
        tp=sum(c.tp for c in items),
        fp=sum(c.fp for c in items),
        tn=sum(c.tn for c in items),
        fn=sum(c.fn for c in items),
        pos_hist=tuple(sum(col) for col in zip(*(c.pos_hist for c in items), strict=True)),
        neg_hist=tuple(sum(col) for col in zip(*(c.neg_hist for c in items), strict=True)),
    )


def _ratio(num: int, den: int) -> float:
    """``num / den``, and 0.0 when ``den`` is 0 (the metric has no cases to score)."""
    return num / den if den else 0.0


def histogram_auc(*, pos_hist: tuple[int, ...], neg_hist: tuple[int, ...]) -> float | None:
    """ROC AUC from score histograms: the Mann-Whitney statistic with ties within a bin as half.

    ``AUC = sum_i pos[i] * (neg[0] + ... + neg[i-1] + neg[i] / 2) / (P * N)``,
    computed in exact integer arithmetic and rounded once.

    Parameters
    ----------
    pos_hist, neg_hist
        Histograms of the positives' and the negatives' scores over the same bins,
        lowest scores first.

    Returns
    -------
    float | None
        The AUC, or None when there are no positives or no negatives (undefined).

    """
    p, n = sum(pos_hist), sum(neg_hist)
    if p == 0 or n == 0:
        return None
    below = 0  # negatives in lower bins
    twice = 0  # twice the Mann-Whitney U, kept integral
    for pos, neg in zip(pos_hist, neg_hist, strict=True):
        twice += pos * (2 * below + neg)
        below += neg
    return twice / (2 * p * n)


def binary_scores(counts: BinaryCounts) -> BinaryScores:
    """Precision, recall, F1, specificity, accuracy and ROC AUC of (merged) counts.

    Parameters
    ----------
    counts
        One site's counts or a merge of several.

    Returns
    -------
    BinaryScores
        A dict: ``precision`` = tp / (tp + fp), 0.0 when nothing is predicted positive;
        ``recall`` = tp / (tp + fn), 0.0 when there are no positives;
        ``f1`` = their harmonic mean, 0.0 when both are 0;
        ``specificity`` = tn / (tn + fp), 0.0 when there are no negatives;
        ``accuracy`` = (tp + tn) / all;
        ``auc`` = :func:`histogram_auc`, None when there are no positives or no
        negatives (a Flower MetricRecord cannot hold None: leave it out).

    Raises
    ------
    ValueError
        ``counts`` counts no samples.

    """
    if counts.total == 0:
        raise ValueError("no samples to score: the counts are all zero")
    precision = _ratio(counts.tp, counts.tp + counts.fp)
    recall = _ratio(counts.tp, counts.positives)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return BinaryScores(
        precision=precision,
        recall=recall,
        f1=f1,
        specificity=_ratio(counts.tn, counts.negatives),
        accuracy=(counts.tp + counts.tn) / counts.total,
        auc=histogram_auc(pos_hist=counts.pos_hist, neg_hist=counts.neg_hist),
    )


def to_metric_lists(counts: BinaryCounts) -> dict[str, list[int]]:
    """The counts as integer lists for a Flower ``MetricRecord``.

    Returns
    -------
    dict[str, list[int]]
        ``"bin-counts"``: ``[tp, fp, tn, fn]``; ``"pos-hist"`` and ``"neg-hist"``:
        the histograms (keys :data:`CONFUSION_KEY`, :data:`POS_HIST_KEY`,
        :data:`NEG_HIST_KEY`). Merge them into a reply's other metrics.

    """
    return {
        CONFUSION_KEY: [counts.tp, counts.fp, counts.tn, counts.fn],
        POS_HIST_KEY: list(counts.pos_hist),
        NEG_HIST_KEY: list(counts.neg_hist),
    }


def from_metric_lists(metrics: Mapping[str, object]) -> BinaryCounts:
    """Read and validate the counts a site sent (the inverse of :func:`to_metric_lists`).

    Parameters
    ----------
    metrics
        A site's reply metrics (a ``MetricRecord`` or any mapping); keys other than
        ``"bin-counts"``, ``"pos-hist"`` and ``"neg-hist"`` are ignored.

    Returns
    -------
    BinaryCounts
        The site's counts.

    Raises
    ------
    ValueError
        A key is missing or not a list of non-negative integers, ``"bin-counts"``
        does not have 4 entries, or the histograms do not fit each other or the
        counts (see :class:`BinaryCounts`); the message says which.

    """
    lists: dict[str, list[int]] = {}
    for key in (CONFUSION_KEY, POS_HIST_KEY, NEG_HIST_KEY):
        if key not in metrics:
            raise ValueError(f"binary counts: missing key {key!r} (present: {sorted(metrics)})")
        value = metrics[key]
        if not isinstance(value, list | tuple):
            raise ValueError(f"binary counts: {key!r} must be a list of integers, got {type(value).__name__}")
        bad = next((i for i, v in enumerate(value) if not _is_count(v)), None)
        if bad is not None:
            raise ValueError(f"binary counts: {key!r}[{bad}] must be a non-negative integer, got {value[bad]!r}")
        lists[key] = [int(v) for v in value]
    confusion = lists[CONFUSION_KEY]
    if len(confusion) != 4:
        raise ValueError(f"binary counts: {CONFUSION_KEY!r} must be [tp, fp, tn, fn], got {len(confusion)} entries")
    tp, fp, tn, fn = confusion
    try:
        return BinaryCounts(
            tp=tp, fp=fp, tn=tn, fn=fn, pos_hist=tuple(lists[POS_HIST_KEY]), neg_hist=tuple(lists[NEG_HIST_KEY])
        )
    except ValueError as err:
        raise ValueError(f"binary counts: {err}") from None


__all__ = [
    "CONFUSION_KEY",
    "DEFAULT_BINS",
    "MAX_BINS",
    "NEG_HIST_KEY",
    "POS_HIST_KEY",
    "BinaryCounts",
    "BinaryScores",
    "binary_counts",
    "binary_scores",
    "from_metric_lists",
    "histogram_auc",
    "merge_counts",
    "to_metric_lists",
]
