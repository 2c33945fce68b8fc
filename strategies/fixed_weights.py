r"""Federated averaging with fixed, configured weights per site.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data", https://arxiv.org/abs/1602.05629) weights each site by
its sample count; here every site has a weight :math:`c_k \ge 0` set in advance
(e.g. agreed between the hospitals of a consortium), and the new global model is
the average over the sites :math:`R` whose replies were accepted this round, with
their weights renormalised:

.. math::

    w \leftarrow \sum_{k \in R} \frac{c_k}{\sum_{j \in R} c_j}\, w_k

(the weighted-averaging mode of the draft's section 6.2.7). A site with weight 0
trains and is evaluated but contributes nothing to the model. If every site that
replied has weight 0, the global model is kept as it was. It needs plaintext
updates (with encryption on, only ``fedavg`` runs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import Array, ArrayRecord, RecordDict

from dmsc_fed.config import FederationConfig
from dmsc_fed.errors import ConfigError
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import ARRAYS_KEY
from strategies.fedavg import WeightedFedAvg, weighted_average
from strategies.registry import register_strategy

__all__ = ["FixedWeightsFedAvg", "renormalized_weights"]

log = logging.getLogger("dmsc_fed.strategy")


def renormalized_weights(*, names: Sequence[str], weights: Mapping[str, float]) -> list[float]:
    r"""The fixed weights of the sites ``names`` that replied, renormalised to sum to 1.

    :math:`c_k / \sum_{j \in R} c_j` for each :math:`k` in ``names``.

    Parameters
    ----------
    names
        The sites whose replies are aggregated this round.
    weights
        Every site's fixed weight :math:`c_k \ge 0`, by site name.

    Returns
    -------
    list[float]
        One weight per name, in input order, summing to 1; all zero when every
        named site has weight 0 (there is nothing to average).

    Raises
    ------
    ValueError
        If a name has no weight, or a weight is negative or not finite.

    """
    missing = sorted(set(names) - set(weights))
    if missing:
        raise ValueError(f"no fixed weight for site(s) {missing}")
    values = [float(weights[n]) for n in names]
    bad = [n for n, v in zip(names, values, strict=True) if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"fixed weights must be finite and non-negative; site(s) {bad} are not")
    total = sum(values)
    if total == 0:
        return [0.0] * len(values)
    return [v / total for v in values]


def _check_weights(weights: object, members: Sequence[str], *, all_members: bool = True) -> dict[str, float]:
    """The ``weights`` option, validated against the member sites (ConfigError naming what is wrong).

    With ``all_members`` false, ``members`` are the sites that joined and ``weights``
    may also name configured sites that stayed away (checked by :meth:`check_config`).
    """
    if weights is None:
        raise ConfigError("strategy fixed-weights needs option weights (a table of site name -> weight)")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"strategy option weights must be a non-empty table of site name -> weight, got {weights!r}")
    out: dict[str, float] = {}
    bad: list[str] = []
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            bad.append(f"{name}={value!r}")
        else:
            out[str(name)] = float(value)
    if bad:
        raise ConfigError(f"strategy option weights must be finite and non-negative numbers; bad: {', '.join(bad)}")
    if not any(v > 0 for v in out.values()):
        raise ConfigError("strategy option weights are all zero; give at least one site a positive weight")
    unknown = sorted(set(out) - set(members))
    if unknown and all_members:
        raise ConfigError(f"strategy option weights names site(s) {unknown} that are not members ({sorted(members)})")
    missing = sorted(set(members) - set(out))
    if missing:
        raise ConfigError(f"strategy option weights gives no weight to member site(s) {missing}")
    return out


@register_strategy("fixed-weights")
class FixedWeightsFedAvg(WeightedFedAvg):
    """FedAvg with a fixed weight per site, renormalised over the sites that replied.

    Parameters
    ----------
    weights
        Site name -> non-negative weight, for exactly the member sites; not all zero. Required.
    sites, expected_arrays, fraction_train, fraction_evaluate, min_sites, on_round, reply_check, seed
        As for :class:`~strategies.WeightedFedAvg`.

    Raises
    ------
    ConfigError
        If ``weights`` is missing, a weight is negative, not finite or not a number, all are zero, a named
        site is not a member, or a member site has no weight.

    """

    def __init__(
        self,
        *,
        weights: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        checked = _check_weights(weights, [s.name for s in kwargs["sites"].values()], all_members=False)
        super().__init__(**kwargs)
        self.weights = checked
        #: Each site's renormalised weight in the latest aggregation, by site name.
        self.last_weights: dict[str, float] = {}

    @classmethod
    def check_config(cls, cfg: FederationConfig) -> None:
        """The weights must name exactly the configured sites."""
        _check_weights(cfg.strategy.options.get("weights"), [s.name for s in cfg.sites])

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """Average of the accepted models with their fixed weights renormalised; the current model if all are 0."""
        names = [site.name for site, _ in accepted]
        weights = renormalized_weights(names=names, weights=self.weights)
        self.last_weights = dict(zip(names, weights, strict=True))
        server_round = self.reports[-1].round if self.reports else 0
        if not any(w > 0 for w in weights):
            if self.current is None:
                raise RuntimeError("no global model to keep: configure_train has not run")
            log.warning(
                "round %d: every site that replied (%s) has fixed weight 0; the global model is unchanged",
                server_round,
                names,
            )
            return self.current
        updates = [{k: a.numpy() for k, a in c[ARRAYS_KEY].items()} for _, c in accepted]  # type: ignore[union-attr]
        averaged = weighted_average(updates, weights)
        return ArrayRecord({k: Array(v) for k, v in averaged.items()})
