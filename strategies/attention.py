r"""Attentive aggregation (FedAtt) as a strategy, in plaintext.

Implements FedAtt (Ji et al. 2019, "Learning Private Neural Language Modeling
with Attentive Aggregation", IJCNN 2019, https://arxiv.org/abs/1812.07108), the
attention mode of the draft's section 6.2.7. For every layer :math:`l` the server
weighs the sites by a softmax over the distances between its parameters
:math:`w^l` and each site's :math:`w_k^l`, then moves by a step :math:`\epsilon`,
optionally adding Gaussian noise of standard deviation :math:`\beta`:

.. math::

    \alpha_k^l = \operatorname{softmax}_k\big(\lVert w^l - w_k^l \rVert_2\big), \qquad
    w^l \leftarrow w^l - \epsilon \sum_k \alpha_k^l (w^l - w_k^l) + \beta\,\mathcal{N}(0, I).

The math is :func:`strategies.aggregators.fedatt`; the base FedAvg it replaces
is McMahan et al. 2017 (https://arxiv.org/abs/1602.05629). The noise is FedAtt's
randomisation, not a calibrated DP mechanism (DP comes from DP-SGD at the sites);
it is drawn from a generator seeded by the strategy's ``seed`` and the round
number, so a run is reproducible, also when it resumes. Each round's attention
weights are kept in :attr:`FedAttFedAvg.last_attention`. The server sees every
site's parameters: this strategy needs plaintext updates (with encryption on,
only ``fedavg`` runs).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from dmsc_fed.errors import ConfigError
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import ARRAYS_KEY
from strategies.aggregators import attention_weights, fedatt
from strategies.fedavg import WeightedFedAvg
from strategies.registry import register_strategy

__all__ = ["FedAttFedAvg"]

log = logging.getLogger("dmsc_fed.strategy")

_SEED_MASK = (1 << 64) - 1  # numpy seeds must be non-negative


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@register_strategy("fedatt")
class FedAttFedAvg(WeightedFedAvg):
    r"""FedAtt: layer-wise attention over the sites' distances to the server model, then a server step.

    Parameters
    ----------
    step_size
        Server step size :math:`\epsilon > 0`; 1 moves the model onto the
        attention-weighted average of the sites' models, less than 1 stays
        closer to the current model, more than 1 extrapolates past it.
    noise_std
        :math:`\beta \ge 0`: standard deviation of the Gaussian noise added to every
        coordinate of the new model (0 for none).
    sites, expected_arrays, fraction_train, fraction_evaluate, min_sites, on_round, reply_check, seed
        As for :class:`~strategies.WeightedFedAvg`; ``seed`` also seeds the noise.

    Attributes
    ----------
    last_attention
        The latest round's attention weights :math:`\alpha_k^l`: site name -> layer
        name -> weight; for every layer the weights over the sites sum to 1.

    Raises
    ------
    ConfigError
        If ``step_size`` is not a finite positive number or ``noise_std`` not a
        finite non-negative one.

    """

    def __init__(
        self,
        *,
        step_size: float = 1.0,
        noise_std: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not _number(step_size) or step_size <= 0:
            raise ConfigError(f"strategy option step_size must be a finite number > 0, got {step_size!r}")
        if not _number(noise_std) or noise_std < 0:
            raise ConfigError(f"strategy option noise_std must be a finite number >= 0, got {noise_std!r}")
        super().__init__(**kwargs)
        self.step_size = float(step_size)
        self.noise_std = float(noise_std)
        self.seed = int(kwargs.get("seed", 0))
        self.last_attention: dict[str, dict[str, float]] = {}

    def noise_rng(self, server_round: int) -> np.random.Generator:
        """The generator of round ``server_round``'s noise: a function of the seed and the round only."""
        return np.random.default_rng([self.seed & _SEED_MASK, server_round & _SEED_MASK])

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """One FedAtt step from the global model sent this round towards the accepted models."""
        if self.current is None:
            raise RuntimeError("FedAtt needs the global model sent this round: configure_train has not run")
        server = {k: a.numpy() for k, a in self.current.items()}
        updates = [{k: a.numpy() for k, a in c[ARRAYS_KEY].items()} for _, c in accepted]  # type: ignore[union-attr]
        alphas = attention_weights(server=server, updates=updates)
        self.last_attention = {
            site.name: {layer: float(alpha[i]) for layer, alpha in alphas.items()}
            for i, (site, _) in enumerate(accepted)
        }
        server_round = self.reports[-1].round if self.reports else 0
        log.debug("round %d: FedAtt attention %s", server_round, self.last_attention)
        new = fedatt(
            server=server,
            updates=updates,
            step_size=self.step_size,
            noise_std=self.noise_std,
            rng=self.noise_rng(server_round),
        )
        return ArrayRecord({k: Array(v) for k, v in new.items()})
