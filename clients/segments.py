"""Segment-aware training at a site (block mode): train what the site was assigned, return only that.

The server tells each site the blocks (offset, length in the flat parameter vector,
in state-dict order) it must return. The site freezes every parameter tensor that
none of its blocks touches (so Opacus clips and noises only the trained ones),
trains, and returns just its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import nn

from dmsc_fed.errors import ConfigError
from dmsc_fed.wire import BLOCK_PREFIX, SEGMENT_BLOCKS, SEGMENT_LENGTHS, SEGMENT_OFFSETS


@dataclass(frozen=True)
class Assignment:
    """The blocks a site trains this round: ``(id, offset, length)`` each."""

    blocks: tuple[tuple[int, int, int], ...]


def assignment(config: ConfigRecord) -> Assignment | None:
    """The site's block assignment from the message config, or None outside block mode."""
    if SEGMENT_BLOCKS not in config:
        return None
    ids = cast(list[int], config[SEGMENT_BLOCKS])
    offsets = cast(list[int], config.get(SEGMENT_OFFSETS, []))
    lengths = cast(list[int], config.get(SEGMENT_LENGTHS, []))
    if not (len(ids) == len(offsets) == len(lengths)) or any(n <= 0 for n in lengths) or any(o < 0 for o in offsets):
        raise ConfigError("the message's block assignment is malformed (ids, offsets and lengths disagree)")
    return Assignment(blocks=tuple(zip(ids, offsets, lengths, strict=True)))


def _spans(model: nn.Module) -> list[tuple[str, int, int]]:
    spans, start = [], 0
    for name, tensor in model.state_dict().items():
        spans.append((name, start, start + tensor.numel()))
        start += tensor.numel()
    return spans


def freeze_outside(model: nn.Module, plan: Assignment) -> list[str]:
    """Freeze every parameter no assigned block touches; returns the names still trained."""
    spans = _spans(model)
    total = spans[-1][2] if spans else 0
    if any(off + n > total for _, off, n in plan.blocks):
        raise ConfigError(f"a block reaches past the model's {total} parameters")
    trained = {name for name, lo, hi in spans for _, off, n in plan.blocks if off < hi and lo < off + n}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    return sorted(trained)


def extract_blocks(model: nn.Module, plan: Assignment) -> ArrayRecord:
    """The assigned blocks of the model's flat parameter vector, as float32 arrays."""
    flat = np.concatenate([t.detach().cpu().numpy().astype(np.float32).ravel() for t in model.state_dict().values()])
    return ArrayRecord(
        {f"{BLOCK_PREFIX}{i:05d}": Array(np.ascontiguousarray(flat[off : off + n])) for i, off, n in plan.blocks}
    )
