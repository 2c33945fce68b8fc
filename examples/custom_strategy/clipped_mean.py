"""A user-written strategy: FedAvg with each site's update clipped in norm.

The server's step from the current global model ``w`` is the sample-weighted
average of the sites' updates ``u_k = w_k - w``, each first scaled down to at
most ``max_update_norm`` in L2 norm, so no single site can move the model far
in one round (the server-side clipping of McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models", without the noise).

Everything else (reply validation, signatures, sampling, refusals, the round
report) comes from :class:`strategies.WeightedFedAvg`; only ``aggregate_arrays``
is new. The config names it as
``strategy.name = "examples.custom_strategy.clipped_mean:ClippedFedAvg"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from dmsc_fed.sites import SiteInfo
from strategies import WeightedFedAvg, weighted_average


def clip_update(update: dict[str, np.ndarray], *, max_norm: float) -> dict[str, np.ndarray]:
    """Scale ``update`` so that its L2 norm over all arrays is at most ``max_norm``."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values())))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}


class ClippedFedAvg(WeightedFedAvg):
    """Weighted FedAvg over norm-clipped updates.

    Parameters
    ----------
    max_update_norm
        Largest L2 norm a site's update may have (from ``strategy.options``).
    """

    def __init__(self, *, max_update_norm: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if max_update_norm <= 0:
            raise ValueError(f"max_update_norm must be positive, got {max_update_norm}")
        self.max_update_norm = max_update_norm

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """Average the clipped updates, weighted by sample count, and apply them to the global model."""
        assert self.current is not None  # set by configure_train
        base = {k: a.numpy().astype(np.float64) for k, a in self.current.items()}
        updates, weights = [], []
        for _, content in accepted:
            site = {k: a.numpy().astype(np.float64) for k, a in content["arrays"].items()}  # type: ignore[union-attr]
            updates.append(clip_update({k: site[k] - base[k] for k in base}, max_norm=self.max_update_norm))
            weights.append(float(content["metrics"]["num-examples"]))  # type: ignore[arg-type]
        step = weighted_average(updates, weights)
        dtypes = {k: a.numpy().dtype for k, a in self.current.items()}
        return ArrayRecord({k: Array((base[k] + step[k]).astype(dtypes[k])) for k in base})
