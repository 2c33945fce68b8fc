"""Voting over the predictions of sub-models.

The aggregation by voting of the DMSC draft (draft-yang-dmsc-distributed-model-03,
section 6.2.7): when segments are whole sub-models (business or block
segmentation), their outputs are combined instead of their parameters. Hard
(plurality) voting counts, per sample, the classes predicted by the sub-models,
optionally weighted; soft voting averages their predicted class probabilities
(Kuncheva 2004, "Combining Pattern Classifiers"; the ``voting="hard"`` and
``voting="soft"`` rules of scikit-learn's ``VotingClassifier``).

Ties are broken towards the smallest class index, as ``np.argmax`` and
scikit-learn do. Weighted counts and probabilities are compared with a relative
tolerance of ``1e-9`` so that, for example, weights ``0.1 + 0.2`` and ``0.3`` tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["majority_vote", "soft_vote", "soft_vote_labels"]

#: Relative tolerance under which two weighted votes or probabilities count as a tie.
TIE_RTOL = 1e-9

#: How far a row of probabilities may sum from 1 (float32 softmax outputs are off by ~1e-7).
ROW_SUM_ATOL = 1e-5


def _check_weights(weights: Sequence[float] | None, n: int, *, what: str) -> NDArray[np.float64]:
    if weights is None:
        return np.ones(n, dtype=np.float64)
    if len(weights) != n:
        raise ValueError(f"{what}: {n} models but {len(weights)} weights")
    if any(isinstance(w, bool) or not math.isfinite(float(w)) or float(w) < 0 for w in weights):
        raise ValueError(f"{what}: weights must be finite and non-negative, got {list(weights)}")
    out = np.asarray([float(w) for w in weights], dtype=np.float64)
    if out.sum() <= 0:
        raise ValueError(f"{what}: weights sum to zero")
    return out


def _argmax_smallest(scores: NDArray[np.float64]) -> NDArray[np.int64]:
    """Per row, the smallest column index whose score ties (within :data:`TIE_RTOL`) with the row's maximum."""
    best = scores.max(axis=1, keepdims=True)
    tol = TIE_RTOL * np.maximum(np.abs(best), 1.0)
    winners: NDArray[np.int64] = np.argmax(scores >= best - tol, axis=1).astype(np.int64)
    return winners


def majority_vote(
    *,
    predictions: Sequence[NDArray[np.integer[Any]]],
    weights: Sequence[float] | None = None,
    num_classes: int | None = None,
) -> NDArray[np.int64]:
    """Per sample, the class with the largest (weighted) number of votes.

    Parameters
    ----------
    predictions
        One 1-D array of predicted class indices per sub-model, all of the same length
        (one entry per sample).
    weights
        One non-negative weight per sub-model (e.g. its validation accuracy); equal
        weights when None.
    num_classes
        The number of classes; labels must lie in ``[0, num_classes)``. When None it is
        one more than the largest label seen.

    Returns
    -------
    NDArray[np.int64]
        The winning class of every sample. Ties go to the smallest class index.

    Raises
    ------
    ValueError
        If there are no predictions, they are not 1-D integer arrays of one length, a
        label is negative or not below ``num_classes``, or the weights are bad.

    """
    if len(predictions) == 0:
        raise ValueError("majority_vote: need the predictions of at least one model")
    preds = [np.asarray(p) for p in predictions]
    n = preds[0].shape[0] if preds[0].ndim == 1 else -1
    for i, p in enumerate(preds):
        if p.ndim != 1:
            raise ValueError(f"majority_vote: predictions of model {i} must be 1-D, got shape {p.shape}")
        if p.dtype == np.bool_ or not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"majority_vote: predictions of model {i} must be integer class indices, got {p.dtype}")
        if p.shape[0] != n:
            raise ValueError(f"majority_vote: model {i} predicts {p.shape[0]} samples, model 0 predicts {n}")
        if p.size and p.min() < 0:
            raise ValueError(f"majority_vote: model {i} predicts a negative class index {p.min()}")
    w = _check_weights(weights, len(preds), what="majority_vote")
    largest = max((int(p.max()) for p in preds if p.size), default=-1)
    if num_classes is None:
        num_classes = largest + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"majority_vote: num_classes must be a positive integer, got {num_classes!r}")
    elif largest >= num_classes:
        raise ValueError(f"majority_vote: class index {largest} is not below num_classes={num_classes}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.zeros((n, num_classes), dtype=np.float64)
    rows = np.arange(n)
    for p, wi in zip(preds, w, strict=True):
        np.add.at(counts, (rows, p), wi)
    return _argmax_smallest(counts)


def soft_vote(
    *,
    probabilities: Sequence[NDArray[np.floating[Any]]],
    weights: Sequence[float] | None = None,
) -> NDArray[np.float64]:
    """Weighted average of the sub-models' class probabilities.

    Parameters
    ----------
    probabilities
        One array of shape ``(samples, classes)`` per sub-model; every row must be a
        probability distribution (non-negative, summing to 1 within ``1e-5``).
    weights
        One non-negative weight per sub-model; equal weights when None.

    Returns
    -------
    NDArray[np.float64]
        The averaged probabilities, shape ``(samples, classes)``; rows sum to 1.

    Raises
    ------
    ValueError
        If there are no arrays, they differ in shape or are not 2-D, a row is not a
        distribution, or the weights are bad.

    """
    if len(probabilities) == 0:
        raise ValueError("soft_vote: need the probabilities of at least one model")
    probs = [np.asarray(p) for p in probabilities]
    shape = probs[0].shape
    for i, p in enumerate(probs):
        if p.ndim != 2 or p.shape[1] == 0:
            raise ValueError(f"soft_vote: probabilities of model {i} must have shape (samples, classes), got {p.shape}")
        if p.shape != shape:
            raise ValueError(f"soft_vote: model {i} has shape {p.shape}, model 0 has {shape}")
        if not np.issubdtype(p.dtype, np.floating):
            raise ValueError(f"soft_vote: probabilities of model {i} must be floating point, got {p.dtype}")
        if not np.isfinite(p).all():
            raise ValueError(f"soft_vote: probabilities of model {i} have non-finite values")
        if (p < 0).any():
            raise ValueError(f"soft_vote: probabilities of model {i} have negative values")
        sums = p.sum(axis=1, dtype=np.float64)
        bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_ATOL)
        if bad.size:
            raise ValueError(
                f"soft_vote: row {int(bad[0])} of model {i} sums to {sums[bad[0]]}, not 1: "
                "not a probability distribution"
            )
    w = _check_weights(weights, len(probs), what="soft_vote")
    acc = np.zeros(shape, dtype=np.float64)
    for p, wi in zip(probs, w, strict=True):
        acc += wi * p.astype(np.float64)
    result: NDArray[np.float64] = acc / w.sum()
    return result


def soft_vote_labels(
    *,
    probabilities: Sequence[NDArray[np.floating[Any]]],
    weights: Sequence[float] | None = None,
) -> NDArray[np.int64]:
    """The class with the highest averaged probability, per sample (see :func:`soft_vote`).

    Ties (within a relative ``1e-9``) go to the smallest class index.

    Parameters
    ----------
    probabilities
        One array of shape ``(samples, classes)`` per sub-model, rows summing to 1.
    weights
        One non-negative weight per sub-model; equal weights when None.

    Returns
    -------
    NDArray[np.int64]
        The winning class of every sample.

    Raises
    ------
    ValueError
        As :func:`soft_vote`.

    """
    avg = soft_vote(probabilities=probabilities, weights=weights)
    if avg.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return _argmax_smallest(avg)
