from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmsc_fed.data.partition import dirichlet_partition, iid_partition, train_test_indices
from dmsc_fed.errors import DataError


def _is_partition(parts: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(parts)
    return joined.size == n and np.array_equal(np.sort(joined), np.arange(n))


@given(n=st.integers(1, 500), k=st.integers(1, 20), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_iid_is_a_near_equal_partition(n: int, k: int, seed: int) -> None:
    if n < k:
        with pytest.raises(DataError):
            iid_partition(num_samples=n, num_parts=k, rng=np.random.default_rng(seed))
        return
    parts = iid_partition(num_samples=n, num_parts=k, rng=np.random.default_rng(seed))
    assert len(parts) == k and _is_partition(parts, n)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_is_deterministic_disjoint_and_skewed() -> None:
    labels = np.repeat([0, 1], 300)
    a = dirichlet_partition(labels=labels, num_parts=3, alpha=0.3, rng=np.random.default_rng(1), min_size=10)
    b = dirichlet_partition(labels=labels, num_parts=3, alpha=0.3, rng=np.random.default_rng(1), min_size=10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert _is_partition(a, labels.size)
    assert min(p.size for p in a) >= 10
    # Strong skew at small alpha, near-uniform class shares at large alpha.
    share = lambda parts: [labels[p].mean() for p in parts]  # noqa: E731
    skewed = share(a)
    even = share(dirichlet_partition(labels=labels, num_parts=3, alpha=1000, rng=np.random.default_rng(1)))
    assert max(skewed) - min(skewed) > 0.3
    assert max(even) - min(even) < 0.15


def test_dirichlet_impossible_min_size_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="at least 50"):
        dirichlet_partition(
            labels=np.zeros(60, dtype=int), num_parts=3, alpha=0.5, rng=np.random.default_rng(0), min_size=50
        )


def test_train_test_split_is_stratified_and_complete() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2])
    tr, te = train_test_indices(labels=labels, test_fraction=0.2, rng=np.random.default_rng(0))
    assert _is_partition([tr, te], labels.size)
    assert sorted(labels[te].tolist()) == [0, 0, 1]  # 2 of class 0, 1 of class 1, the lone class-2 sample trains
    assert 2 in labels[tr]
