"""Robust FedAvg variants: the global model by coordinate-wise median, trimmed mean or Krum.

Each is :class:`~strategies.WeightedFedAvg` with another ``aggregate_arrays``; the
math lives in :mod:`strategies.aggregators` (Yin et al. 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates"; Blanchard et al. 2017,
"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent"). They
need plaintext updates: with encryption on, only weighted averaging is possible.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, RecordDict

from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import ARRAYS_KEY
from strategies.aggregators import coordinate_median, krum, trimmed_mean
from strategies.fedavg import WeightedFedAvg
from strategies.registry import register_strategy


def _updates(accepted: list[tuple[SiteInfo, RecordDict]]) -> list[dict[str, Any]]:
    return [{k: a.numpy() for k, a in c[ARRAYS_KEY].items()} for _, c in accepted]  # type: ignore[union-attr]


@register_strategy("median")
class MedianFedAvg(WeightedFedAvg):
    """The global model is the coordinate-wise median of the accepted updates."""

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """Coordinate-wise median."""
        return ArrayRecord({k: Array(v) for k, v in coordinate_median(_updates(accepted)).items()})


@register_strategy("trimmed-mean")
class TrimmedMeanFedAvg(WeightedFedAvg):
    """The global model is the coordinate-wise mean after cutting ``beta`` of the values at each end."""

    def __init__(self, *, beta: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.beta = beta

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """Trimmed mean."""
        return ArrayRecord({k: Array(v) for k, v in trimmed_mean(_updates(accepted), beta=self.beta).items()})


@register_strategy("krum")
class KrumFedAvg(WeightedFedAvg):
    """The global model is the update Krum selects (or the mean of Multi-Krum's ``num_to_keep``)."""

    def __init__(self, *, num_malicious: int = 0, num_to_keep: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_malicious = num_malicious
        self.num_to_keep = num_to_keep

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """Krum / Multi-Krum selection."""
        chosen = krum(_updates(accepted), num_malicious=self.num_malicious, num_to_keep=self.num_to_keep)
        return ArrayRecord({k: Array(v) for k, v in chosen.items()})
