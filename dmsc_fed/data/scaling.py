"""Feature standardization fitted on training splits only, combined across sites.

Each site computes :class:`FeatureStats` (count, per-feature sum and sum of
squares) over its own training split; the server combines them with
:func:`fit_scaler` into one mean and standard deviation that every site applies.
No raw row leaves a site and no test sample is ever used for fitting. With
``dataset.scaling = "local"`` each site fits on its own training split alone,
which is stricter but gives every site a different feature space (under label
skew that costs a global model many points of accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import DataError

MIN_STD = 1e-8


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of one site's training features."""

    count: int
    total: NDArray[np.float64]
    total_sq: NDArray[np.float64]

    @classmethod
    def of(cls, x: NDArray[np.floating]) -> FeatureStats:
        """Statistics of the rows of ``x``."""
        x64 = np.asarray(x, dtype=np.float64)
        return cls(count=int(x64.shape[0]), total=x64.sum(axis=0), total_sq=(x64**2).sum(axis=0))


@dataclass(frozen=True)
class Scaler:
    """A fitted standardization ``(x - mean) / std``."""

    mean: NDArray[np.float64]
    std: NDArray[np.float64]

    def apply(self, x: NDArray[np.floating]) -> NDArray[np.float32]:
        """Standardize ``x`` (rows are samples)."""
        if x.shape[1] != self.mean.shape[0]:
            raise DataError(f"data has {x.shape[1]} features, the scaler was fitted on {self.mean.shape[0]}")
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)


def fit_scaler(stats: Sequence[FeatureStats]) -> Scaler:
    """Mean and (population) standard deviation of all rows behind ``stats``.

    Features with a standard deviation below ``MIN_STD`` are left unscaled
    (divided by 1) rather than blown up.
    """
    if not stats:
        raise DataError("cannot fit a scaler without statistics from at least one site")
    widths = {s.total.shape for s in stats}
    if len(widths) != 1:
        raise DataError(f"sites report different feature counts: {sorted(w[0] for w in widths)}")
    n = sum(s.count for s in stats)
    if n <= 0:
        raise DataError("cannot fit a scaler on zero samples")
    mean = sum(s.total for s in stats) / n
    var = np.maximum(sum(s.total_sq for s in stats) / n - mean**2, 0.0)
    std = np.sqrt(var)
    std[std < MIN_STD] = 1.0
    return Scaler(mean=np.asarray(mean, dtype=np.float64), std=std)
