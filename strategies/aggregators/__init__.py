"""Pure aggregation functions for segment updates, and a registry of them by name.

Every function takes the sites' updates as one mapping of named arrays per site
(``Sequence[Mapping[str, NDArray]]``, as :func:`strategies.fedavg.weighted_average`),
validates them (``ValueError`` with the reason), computes in float64 and returns a
``dict[str, NDArray]`` in the dtype of the first update.

:data:`AGGREGATORS` maps the names a segment's config may use to the parameter
aggregators. They share one calling convention, keywords only::

    get_aggregator(name)(updates=updates, **params)

with ``params`` per name:

==================  ==========================================================
``"mean"``          ``weights`` (e.g. sample counts): FedAvg
``"median"``        none: coordinate-wise median (Yin et al. 2018)
``"trimmed-mean"``  ``beta``: coordinate-wise trimmed mean (Yin et al. 2018)
``"krum"``          ``num_malicious``, optional ``num_to_keep``, ``weights``:
                    (Multi-)Krum (Blanchard et al. 2017)
``"attention"``     ``server``, ``step_size``, optional ``noise_std``, ``rng``:
                    FedAtt (Ji et al. 2019)
==================  ==========================================================

Voting (:func:`majority_vote`, :func:`soft_vote`) combines sub-models' predictions,
not parameters, and so is not in the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from numpy.typing import NDArray

from strategies.aggregators.attention import (
    attention_from_scores,
    attention_step,
    attention_weights,
    fedatt,
    layer_distances,
)
from strategies.aggregators.median import check_updates, coordinate_median
from strategies.aggregators.robust import krum, krum_select, trimmed_mean
from strategies.aggregators.voting import majority_vote, soft_vote, soft_vote_labels
from strategies.fedavg import weighted_average

#: A parameter aggregator: called with ``updates=`` and its own keyword parameters.
Aggregator = Callable[..., dict[str, NDArray[Any]]]

#: The per-segment parameter aggregators by name (see the module docstring for their parameters).
AGGREGATORS: dict[str, Aggregator] = {
    "mean": weighted_average,
    "median": coordinate_median,
    "trimmed-mean": trimmed_mean,
    "krum": krum,
    "attention": fedatt,
}


def get_aggregator(name: str) -> Aggregator:
    """The parameter aggregator registered as ``name``.

    Parameters
    ----------
    name
        One of the keys of :data:`AGGREGATORS`.

    Returns
    -------
    Aggregator
        The function; call it with ``updates=`` and its keyword parameters.

    Raises
    ------
    ValueError
        If no aggregator has that name; the message lists the known names.

    """
    try:
        return AGGREGATORS[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(k) for k in sorted(AGGREGATORS))
        raise ValueError(f"unknown aggregator {name!r}; known aggregators: {known}") from None


__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "attention_from_scores",
    "attention_step",
    "attention_weights",
    "check_updates",
    "coordinate_median",
    "fedatt",
    "get_aggregator",
    "krum",
    "krum_select",
    "layer_distances",
    "majority_vote",
    "soft_vote",
    "soft_vote_labels",
    "trimmed_mean",
    "weighted_average",
]
