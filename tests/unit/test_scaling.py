from __future__ import annotations

import numpy as np
import pytest

from dmsc_fed.data.scaling import FeatureStats, fit_scaler
from dmsc_fed.errors import DataError


def test_combined_statistics_hand_computed() -> None:
    # Site 1 holds rows 1 and 3, site 2 holds row 5 (feature 2 is constant 7).
    s1 = FeatureStats.of(np.array([[1.0, 7.0], [3.0, 7.0]]))
    s2 = FeatureStats.of(np.array([[5.0, 7.0]]))
    scaler = fit_scaler([s1, s2])
    assert scaler.mean.tolist() == [3.0, 7.0]
    # population variance of (1, 3, 5) = (4 + 0 + 4) / 3; constant feature keeps std 1
    assert scaler.std[0] == pytest.approx(np.sqrt(8 / 3))
    assert scaler.std[1] == 1.0
    assert scaler.apply(np.array([[3.0, 7.0]])).tolist() == [[0.0, 0.0]]


def test_federated_equals_pooled() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(i, i + 1, size=(20 + i, 4)) for i in range(3)]
    fed = fit_scaler([FeatureStats.of(p) for p in parts])
    pooled = np.concatenate(parts)
    np.testing.assert_allclose(fed.mean, pooled.mean(0), rtol=1e-12)
    np.testing.assert_allclose(fed.std, pooled.std(0), rtol=1e-10)


def test_bad_statistics() -> None:
    with pytest.raises(DataError, match="at least one site"):
        fit_scaler([])
    with pytest.raises(DataError, match="different feature counts"):
        fit_scaler([FeatureStats.of(np.ones((2, 3))), FeatureStats.of(np.ones((2, 4)))])
    with pytest.raises(DataError, match="features"):
        fit_scaler([FeatureStats.of(np.ones((2, 3)))]).apply(np.ones((1, 2)))
