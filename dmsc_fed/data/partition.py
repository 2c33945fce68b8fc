"""Pure partitioning functions: which sample indices each site holds.

Both functions are deterministic for a given ``numpy.random.Generator`` state and
return disjoint index arrays covering every sample exactly once.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import DataError


def iid_partition(*, num_samples: int, num_parts: int, rng: np.random.Generator) -> list[NDArray[np.int64]]:
    """Shuffle ``range(num_samples)`` and cut it into ``num_parts`` near-equal parts."""
    if num_parts < 1:
        raise DataError(f"cannot split data into {num_parts} parts")
    if num_samples < num_parts:
        raise DataError(f"{num_samples} samples cannot be split across {num_parts} sites")
    perm = rng.permutation(num_samples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_parts)]


def dirichlet_partition(
    *,
    labels: NDArray[np.integer],
    num_parts: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[NDArray[np.int64]]:
    """Label-skewed split: each class is divided across parts by Dirichlet(alpha).

    Smaller ``alpha`` gives stronger skew. Draws are repeated until every part
    holds at least ``min_size`` samples (the usual scheme of Hsu et al. 2019,
    "Measuring the Effects of Non-Identical Data Distribution").
    """
    if num_parts < 1:
        raise DataError(f"cannot split data into {num_parts} parts")
    if alpha <= 0:
        raise DataError(f"Dirichlet alpha must be positive, got {alpha}")
    labels = np.asarray(labels)
    if labels.size < num_parts * min_size:
        raise DataError(f"{labels.size} samples cannot give {num_parts} sites at least {min_size} samples each")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(shares) * idx.size).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {num_parts} sites "
        f"{min_size} samples in {max_tries} draws; raise alpha or lower min_samples_per_site"
    )


def train_test_indices(
    *, labels: NDArray[np.integer], test_fraction: float, rng: np.random.Generator
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Split one site's samples into train and test, stratified by label where possible.

    Every class with at least two samples puts at least one in each split; the
    test split is never empty.
    """
    labels = np.asarray(labels)
    n = labels.size
    if n < 2:
        raise DataError(f"a site needs at least 2 samples for a train/test split, has {n}")
    test: list[int] = []
    train: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = round(idx.size * test_fraction)
        k = min(max(k, 1), idx.size - 1) if idx.size >= 2 else 0
        test.extend(idx[:k].tolist())
        train.extend(idx[k:].tolist())
    if not test:
        test.append(train.pop())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))
