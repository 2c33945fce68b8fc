"""Coordinate-wise median of the sites' updates.

Implements the median-based aggregation of Yin et al. 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates" (ICML 2018,
https://arxiv.org/abs/1803.01498): every coordinate of the new model is the
median of that coordinate over the sites, so fewer than half of the sites cannot
drag it arbitrarily far, while the mean follows a single outlier anywhere.

Flower's ``FedMedian`` computes the same thing inline in ``aggregate_train`` (and
the legacy ``flwr.server.strategy.aggregate.aggregate_median`` is ``np.median``
over the stacked layers); this module calls ``np.median`` directly on our
named-array representation.

This module also holds :func:`check_updates`, the input check shared by the
aggregators of this package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["check_updates", "coordinate_median", "stack_layer"]


def check_updates(updates: Sequence[Mapping[str, NDArray[Any]]], *, what: str = "updates") -> list[str]:
    """Check that ``updates`` can be aggregated coordinate by coordinate; return the layer names.

    Parameters
    ----------
    updates
        One mapping of named arrays per site.
    what
        How the input is called in error messages.

    Returns
    -------
    list[str]
        The layer names, in the order of the first update.

    Raises
    ------
    ValueError
        If ``updates`` is empty, an update has other names or shapes than the first,
        an array is not real-valued numeric, or a value is not finite.

    """
    if len(updates) == 0:
        raise ValueError(f"{what}: need at least one update")
    first = updates[0]
    if not isinstance(first, Mapping):
        raise ValueError(f"{what}: update 0 is a {type(first).__name__}, not a mapping of named arrays")
    keys = list(first)
    if not keys:
        raise ValueError(f"{what}: update 0 holds no arrays")
    for i, upd in enumerate(updates):
        if not isinstance(upd, Mapping):
            raise ValueError(f"{what}: update {i} is a {type(upd).__name__}, not a mapping of named arrays")
        missing = sorted(set(keys) - set(upd))
        extra = sorted(set(upd) - set(keys))
        if missing or extra:
            raise ValueError(f"{what}: update {i} has mismatched keys (missing {missing}, unexpected {extra})")
        for key in keys:
            arr = np.asarray(upd[key])
            ref = np.asarray(first[key])
            if arr.shape != ref.shape:
                raise ValueError(f"{what}: update {i} has shape {arr.shape} for {key!r}, update 0 has {ref.shape}")
            if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
                raise ValueError(f"{what}: update {i} has non-numeric dtype {arr.dtype} for {key!r}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{what}: update {i} has non-finite values in {key!r}")
    return keys


def stack_layer(updates: Sequence[Mapping[str, NDArray[Any]]], key: str) -> NDArray[np.float64]:
    """Stack layer ``key`` of every update along a new first axis, in float64."""
    return np.stack([np.asarray(u[key], dtype=np.float64) for u in updates])


def coordinate_median(updates: Sequence[Mapping[str, NDArray[Any]]]) -> dict[str, NDArray[Any]]:
    """Coordinate-wise median of each named array over ``updates`` (Yin et al. 2018).

    With an even number of sites the median of a coordinate is the mean of its two
    middle values (``np.median``). Computed in float64; returned in the dtype of the
    first update (so integer arrays are truncated, as in ``weighted_average``).

    Parameters
    ----------
    updates
        One mapping of named arrays per site, all with the same names and shapes.

    Returns
    -------
    dict[str, NDArray]
        The median of every named array.

    Raises
    ------
    ValueError
        On empty input, mismatched names or shapes, or non-finite values.

    """
    keys = check_updates(updates, what="coordinate_median")
    dtypes = {k: np.asarray(updates[0][k]).dtype for k in keys}
    return {k: np.median(stack_layer(updates, k), axis=0).astype(dtypes[k]) for k in keys}
