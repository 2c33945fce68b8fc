"""Byzantine-robust aggregation with Flower's own implementations: trimmed mean and (Multi-)Krum.

- Coordinate-wise trimmed mean, Yin et al. 2018, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates" (ICML 2018,
  https://arxiv.org/abs/1803.01498): per coordinate, drop the ``floor(beta * n)``
  largest and smallest of the ``n`` values and average the rest.
- Krum and Multi-Krum, Blanchard et al. 2017, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent" (NeurIPS 2017,
  https://arxiv.org/abs/1703.02757): score every update by the sum of its squared
  distances to its ``n - f - 2`` nearest neighbours, with ``f`` the number of
  malicious sites tolerated, and keep the best-scored (Krum) or the ``m``
  best-scored, averaged (Multi-Krum). Krum scores *whole models*: all named arrays
  are flattened into one vector.

The math is Flower's (``flwr.serverapp.strategy``, the message-API strategies the
project builds on): :func:`trimmed_mean` calls ``fedtrimmedavg.trim_mean`` on each
stacked layer and :func:`krum_select` calls ``multikrum.select_multikrum``. This
module only converts our named-array updates to the form those functions take
(float64, so that Flower's ``||x||^2 + ||y||^2 - 2 x.y`` distances do not lose the
small differences between honest float32 models) and checks the input first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean as _flwr_trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum as _flwr_select_multikrum
from numpy.typing import NDArray

from strategies.aggregators.median import check_updates, stack_layer
from strategies.fedavg import weighted_average

__all__ = ["krum", "krum_select", "trimmed_mean"]

_RECORD_KEY = "arrays"


def trimmed_mean(updates: Sequence[Mapping[str, NDArray[Any]]], *, beta: float) -> dict[str, NDArray[Any]]:
    """Coordinate-wise ``beta``-trimmed mean of each named array over ``updates`` (Yin et al. 2018).

    Per coordinate, the ``floor(beta * n)`` smallest and largest of the ``n`` sites'
    values are dropped and the rest averaged (Flower's ``trim_mean``, after
    ``scipy.stats.trim_mean``). With few sites ``floor(beta * n)`` may be 0: with 4
    sites, ``beta`` must be at least 0.25 to drop anything. Computed in float64;
    returned in the dtype of the first update.

    Parameters
    ----------
    updates
        One mapping of named arrays per site, all with the same names and shapes.
    beta
        Fraction cut from each end, in ``[0, 0.5)``; 0 gives the plain mean.

    Returns
    -------
    dict[str, NDArray]
        The trimmed mean of every named array.

    Raises
    ------
    ValueError
        On empty input, mismatched names or shapes, non-finite values, or ``beta``
        outside ``[0, 0.5)``.

    """
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: beta must be a fraction in [0, 0.5), got {beta!r}")
    keys = check_updates(updates, what="trimmed_mean")
    out: dict[str, NDArray[Any]] = {}
    for key in keys:
        mean = np.asarray(_flwr_trim_mean(stack_layer(updates, key), float(beta)))
        out[key] = mean.astype(np.asarray(updates[0][key]).dtype)
    return out


def _check_krum(n: int, num_malicious: int, num_to_keep: int) -> None:
    for name, value in (("num_malicious", num_malicious), ("num_to_keep", num_to_keep)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"krum: {name} must be an integer, got {value!r}")
    if num_malicious < 0:
        raise ValueError(f"krum: num_malicious must be non-negative, got {num_malicious}")
    if n <= 2 * num_malicious + 2:
        raise ValueError(
            f"krum: with num_malicious={num_malicious} Krum needs more than 2*num_malicious + 2 = "
            f"{2 * num_malicious + 2} updates (Blanchard et al. 2017), got {n}"
        )
    if not 1 <= num_to_keep <= n - num_malicious:
        raise ValueError(
            f"krum: num_to_keep must be between 1 and n - num_malicious = {n - num_malicious}, got {num_to_keep}"
        )


def krum_select(
    updates: Sequence[Mapping[str, NDArray[Any]]], *, num_malicious: int, num_to_keep: int = 1
) -> list[int]:
    """Indices of the updates that (Multi-)Krum keeps, best-scored first (Blanchard et al. 2017).

    Parameters
    ----------
    updates
        One mapping of named arrays per site; ``n = len(updates)``.
    num_malicious
        ``f``, the number of Byzantine sites to tolerate; requires ``n > 2f + 2``.
    num_to_keep
        ``m``, how many updates to keep, in ``[1, n - f]``; 1 is Krum.

    Returns
    -------
    list[int]
        Indices into ``updates``, lowest (best) Krum score first.

    Raises
    ------
    ValueError
        On empty input, mismatched names or shapes, non-finite values, or parameters
        outside the ranges above.

    """
    keys = check_updates(updates, what="krum")
    _check_krum(len(updates), num_malicious, num_to_keep)
    contents = [
        RecordDict({_RECORD_KEY: ArrayRecord({k: Array(np.asarray(u[k], dtype=np.float64)) for k in keys})})
        for u in updates
    ]
    selected = _flwr_select_multikrum(contents, num_malicious_nodes=int(num_malicious), num_nodes_to_select=num_to_keep)
    index = {id(c): i for i, c in enumerate(contents)}
    return [index[id(c)] for c in selected]


def krum(
    updates: Sequence[Mapping[str, NDArray[Any]]],
    *,
    num_malicious: int,
    num_to_keep: int = 1,
    weights: Sequence[float] | None = None,
) -> dict[str, NDArray[Any]]:
    """Krum (``num_to_keep=1``) or Multi-Krum aggregation (Blanchard et al. 2017).

    Krum returns the selected update itself; Multi-Krum the average of the
    ``num_to_keep`` selected ones, weighted by ``weights`` (e.g. sample counts, as
    Flower's ``MultiKrum`` does) or equally. Returned in the dtype of the first update.

    Parameters
    ----------
    updates
        One mapping of named arrays per site; ``n = len(updates)``.
    num_malicious
        ``f``, the number of Byzantine sites to tolerate; requires ``n > 2f + 2``.
    num_to_keep
        ``m``, how many updates to keep and average, in ``[1, n - f]``.
    weights
        One finite non-negative weight per update, used to average the kept ones;
        equal weights when None.

    Returns
    -------
    dict[str, NDArray]
        The aggregated named arrays.

    Raises
    ------
    ValueError
        On empty input, mismatched names or shapes, non-finite values, bad
        ``num_malicious``/``num_to_keep``, or bad weights.

    """
    if weights is not None:
        if len(weights) != len(updates):
            raise ValueError(f"krum: {len(updates)} updates but {len(weights)} weights")
        if any(isinstance(w, bool) or not math.isfinite(float(w)) or float(w) < 0 for w in weights):
            raise ValueError(f"krum: weights must be finite and non-negative, got {list(weights)}")
    chosen = krum_select(updates, num_malicious=num_malicious, num_to_keep=num_to_keep)
    kept_weights = [1.0 if weights is None else float(weights[i]) for i in chosen]
    averaged = weighted_average([updates[i] for i in chosen], kept_weights)
    return {k: v.astype(np.asarray(updates[0][k]).dtype) for k, v in averaged.items()}
