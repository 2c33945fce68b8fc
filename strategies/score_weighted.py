r"""Federated averaging weighted by each site's reported validation score.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data", https://arxiv.org/abs/1602.05629) weights site
:math:`k`'s model by its sample count :math:`n_k`. This variant weights it by the
validation score :math:`s_k \in [0, 1]` the site reports for its trained local
model (``SCORE_KEY`` in the reply's metrics: its accuracy on its own validation
split), optionally times :math:`n_k`:

.. math::

    w \leftarrow \frac{\sum_k \lambda_k w_k}{\sum_k \lambda_k}, \qquad
    \lambda_k = \begin{cases} s_k\,(n_k) & s_k \ge s_{\min} \\ 0 & \text{otherwise} \end{cases}

(the weighted-averaging mode of the draft's section 6.2.7). Sites below
``min_score`` are left out of the average. When no accepted reply has a positive
weight, the round falls back to plain sample weights and logs why.

Scores are self-reported and cannot be checked by the server: a site that
overstates its score gains weight. Use this among sites trusted to report
honestly. It needs plaintext updates (with encryption on, only ``fedavg`` runs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from dmsc_fed.errors import ConfigError
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, SCORE_KEY
from strategies.fedavg import WeightedFedAvg, weighted_average
from strategies.registry import register_strategy

__all__ = ["ScoreWeightedFedAvg", "check_score", "score_weights"]

log = logging.getLogger("dmsc_fed.strategy")


def score_weights(
    *,
    scores: Sequence[float],
    samples: Sequence[float],
    times_samples: bool = False,
    min_score: float = 0.0,
) -> list[float]:
    r"""Aggregation weight of every site from its validation score.

    :math:`\lambda_k = s_k` (or :math:`s_k n_k` with ``times_samples``) when
    :math:`s_k \ge` ``min_score``, else 0. The weights are not normalised.

    Parameters
    ----------
    scores
        Each site's validation score :math:`s_k \in [0, 1]`.
    samples
        Each site's training sample count :math:`n_k \ge 0`, in the same order.
    times_samples
        Multiply each score by the site's sample count.
    min_score
        Sites whose score is below this (in :math:`[0, 1]`) get weight 0.

    Returns
    -------
    list[float]
        One weight per site, in input order. All zero when no site has a positive
        score at or above ``min_score``; the caller decides what to do then.

    Raises
    ------
    ValueError
        If the lengths differ, a score is not finite or outside :math:`[0, 1]`, a
        sample count is not finite or negative, or ``min_score`` is outside :math:`[0, 1]`.

    """
    if len(scores) != len(samples):
        raise ValueError(f"{len(scores)} scores but {len(samples)} sample counts")
    if not (math.isfinite(min_score) and 0.0 <= min_score <= 1.0):
        raise ValueError(f"min_score must be in [0, 1], got {min_score}")
    weights: list[float] = []
    for i, (s, n) in enumerate(zip(scores, samples, strict=True)):
        if not (math.isfinite(s) and 0.0 <= s <= 1.0):
            raise ValueError(f"score {i} must be a finite number in [0, 1], got {s}")
        if not (math.isfinite(n) and n >= 0):
            raise ValueError(f"sample count {i} must be finite and non-negative, got {n}")
        if s < min_score:
            weights.append(0.0)
        else:
            weights.append(float(s) * float(n) if times_samples else float(s))
    return weights


def check_score(metrics: Mapping[str, object]) -> str | None:
    """Why a training reply's validation score is unusable (None if it is a finite number in [0, 1])."""
    if SCORE_KEY not in metrics:
        return f"metrics lack {SCORE_KEY!r} (the site's validation score, which score weighting needs)"
    value = metrics[SCORE_KEY]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{SCORE_KEY!r} must be a number, got {type(value).__name__} {value!r}"
    if not math.isfinite(value):
        return f"{SCORE_KEY!r} is not finite ({value!r})"
    if not 0.0 <= value <= 1.0:
        return f"{SCORE_KEY!r} = {value} is outside [0, 1]"
    return None


@register_strategy("score-weighted")
class ScoreWeightedFedAvg(WeightedFedAvg):
    """FedAvg weighted by each site's reported validation score.

    Parameters
    ----------
    times_samples
        Weight by score times sample count instead of by score alone.
    min_score
        Replies whose score is below this (in [0, 1]) are left out of the average.
    sites, expected_arrays, fraction_train, fraction_evaluate, min_sites, on_round, reply_check, seed
        As for :class:`~strategies.WeightedFedAvg`.

    Raises
    ------
    ConfigError
        If ``times_samples`` is not a boolean or ``min_score`` is not a number in [0, 1].

    """

    def __init__(
        self,
        *,
        times_samples: bool = False,
        min_score: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(times_samples, bool):
            raise ConfigError(f"strategy option times_samples must be true or false, got {times_samples!r}")
        if (
            isinstance(min_score, bool)
            or not isinstance(min_score, int | float)
            or not (math.isfinite(min_score) and 0.0 <= min_score <= 1.0)
        ):
            raise ConfigError(f"strategy option min_score must be a number in [0, 1], got {min_score!r}")
        super().__init__(**kwargs)
        self.times_samples = times_samples
        self.min_score = float(min_score)
        #: Each site's normalised weight in the latest aggregation, by site name.
        self.last_weights: dict[str, float] = {}

    def check_train(self, site: SiteInfo, content: RecordDict, server_round: int) -> str | None:
        """The base checks, then: the reply must carry a validation score in [0, 1]."""
        reason = super().check_train(site, content, server_round)
        if reason is not None:
            return reason
        metrics = content[METRICS_KEY]
        assert isinstance(metrics, MetricRecord)  # checked by the base class
        return check_score(metrics)

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """Average of the accepted models weighted by their scores (sample weights if every weight is zero)."""
        metrics = [c[METRICS_KEY] for _, c in accepted]
        scores = [float(m[SCORE_KEY]) for m in metrics]  # type: ignore[arg-type]
        samples = [float(m[NUM_EXAMPLES_KEY]) for m in metrics]  # type: ignore[arg-type]
        weights = score_weights(
            scores=scores, samples=samples, times_samples=self.times_samples, min_score=self.min_score
        )
        names = [site.name for site, _ in accepted]
        server_round = self.reports[-1].round if self.reports else 0
        if not any(w > 0 for w in weights):
            log.warning(
                "round %d: no accepted reply has a positive score at or above min_score=%s (scores %s); "
                "averaging by sample count instead",
                server_round,
                self.min_score,
                dict(zip(names, scores, strict=True)),
            )
            weights = samples
        else:
            below = [n for n, s in zip(names, scores, strict=True) if s < self.min_score]
            if below:
                log.info(
                    "round %d: %s left out of the average: score below min_score=%s",
                    server_round,
                    below,
                    self.min_score,
                )
        total = sum(weights)
        self.last_weights = {n: w / total for n, w in zip(names, weights, strict=True)}
        updates = [{k: a.numpy() for k, a in c[ARRAYS_KEY].items()} for _, c in accepted]  # type: ignore[union-attr]
        averaged = weighted_average(updates, weights)
        return ArrayRecord({k: Array(v) for k, v in averaged.items()})
