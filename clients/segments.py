"""Segment-aware training at a site: train what the site was assigned, return only that.

In a segmented task the config record carries the run's segment layout (every
segment's parameter pieces, sites, privacy and rule) and, per site, the names of the
segments it trains this round with their weight totals. The site freezes every
parameter tensor none of its segments touches (so Opacus clips and noises only the
trained ones), trains, and returns just its segments: plaintext ones as one float32
vector each, encrypted ones as CKKS ciphertexts of ``weight * values``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from numpy.typing import NDArray
from torch import nn

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation.layout import RunSegment, SegmentLayout
from dmsc_fed.wire import (
    SEGMENT_NAMES,
    SEGMENT_WEIGHT_TOTALS,
    SEGMENTS_KEY,
    segment_chunk_key,
    segment_key,
    segment_weight_key,
)

#: ``encrypt(values) -> serialized ciphertext chunks``, with the site's secret context.
Encrypt = Callable[[NDArray[np.float64]], list[bytes]]


@dataclass(frozen=True)
class Assignment:
    """What a site trains this round: its segments and, per segment, the round's weight total."""

    layout: SegmentLayout
    segments: tuple[RunSegment, ...]
    weight_totals: Mapping[str, float]

    @property
    def dp(self) -> bool:
        """Whether the site trains with DP-SGD: when any of its segments asks for it."""
        return any(s.dp for s in self.segments)

    @property
    def encrypted(self) -> bool:
        """Whether any of its segments travels encrypted."""
        return any(s.encrypted for s in self.segments)


def layout_of(config: ConfigRecord) -> SegmentLayout | None:
    """The run's segment layout from the message config, or None for whole-model training."""
    if SEGMENTS_KEY not in config:
        return None
    return SegmentLayout.from_json(str(config[SEGMENTS_KEY]))


def assignment(config: ConfigRecord, *, site: str) -> Assignment | None:
    """The site's segments this round, or None for whole-model training.

    Raises
    ------
    ConfigError
        A segment the layout does not have or that is not the site's, or weight
        totals that do not line up with the segment names.

    """
    layout = layout_of(config)
    if layout is None:
        return None
    names = [str(n) for n in cast(list[str], config.get(SEGMENT_NAMES, []))]
    totals = [float(t) for t in cast(list[float], config.get(SEGMENT_WEIGHT_TOTALS, []))]
    if len(totals) != len(names):
        raise ConfigError("the message's segment assignment is malformed (names and weight totals disagree)")
    segments = tuple(layout.segment(n) for n in names)
    foreign = [s.name for s in segments if site not in s.sites]
    if foreign:
        raise ConfigError(f"the server assigned segment(s) {foreign} to {site!r}, which the layout gives to others")
    return Assignment(layout=layout, segments=segments, weight_totals=dict(zip(names, totals, strict=True)))


def freeze_outside(model: nn.Module, plan: Assignment) -> list[str]:
    """Freeze every parameter none of the site's segments touches; returns the names still trained."""
    trained = plan.layout.trained_parameters(plan.segments)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    return sorted(trained)


def seal_segments(
    model: nn.Module, plan: Assignment, *, num_examples: int, encrypt: Encrypt | None
) -> tuple[ArrayRecord, dict[str, float]]:
    """The site's segments as the reply's arrays, and the weights it applied to encrypted ones.

    Raises
    ------
    ConfigError
        An encrypted segment whose weight total is not positive.

    """
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    record = ArrayRecord()
    weights: dict[str, float] = {}
    for seg in plan.segments:
        values = plan.layout.gather(state, seg)
        if not seg.encrypted:
            record[segment_key(seg.name)] = Array(np.ascontiguousarray(values.astype(np.float32)))
            continue
        total = plan.weight_totals.get(seg.name, 0.0)
        if total <= 0:
            raise ConfigError(f"segment {seg.name!r} is encrypted but its weight total is {total}")
        if encrypt is None:  # pragma: no cover - the caller passes one whenever a segment is encrypted
            raise ConfigError(f"segment {seg.name!r} is encrypted but the site has no encryption at hand")
        weight = num_examples / total
        for i, chunk in enumerate(encrypt(values * weight)):
            record[segment_chunk_key(seg.name, i)] = Array(np.frombuffer(chunk, dtype=np.uint8))
        weights[segment_weight_key(seg.name)] = weight
    return record, weights
