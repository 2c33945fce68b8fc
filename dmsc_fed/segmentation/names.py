"""Names shared by the segmentation planners (draft-yang-dmsc-distributed-model-03, 6.2.4-6.2.5).

A plan names each of its segments so that a per-segment setting (privacy, for one)
can refer to it: ``stage-<k>`` for the k-th pipeline stage of layer segmentation,
``backbone`` and the task names for business segmentation, ``block-<i>`` for block
segmentation. Parameter prefixes match on dotted-name boundaries, the way PyTorch
names parameters: ``encoder`` covers ``encoder.0.weight`` but not ``encoder2.bias``.
"""

from __future__ import annotations

BACKBONE = "backbone"
STAGE_PREFIX = "stage-"
BLOCK_PREFIX = "block-"


def stage_segment(index: int) -> str:
    """Segment name of pipeline stage ``index`` (0-based)."""
    return f"{STAGE_PREFIX}{index}"


def block_segment(index: int) -> str:
    """Segment name of block ``index`` (0-based)."""
    return f"{BLOCK_PREFIX}{index}"


def segment_index(*, name: str, prefix: str) -> int | None:
    """The index in ``name`` = ``prefix`` + digits, or None when ``name`` has another form."""
    rest = name.removeprefix(prefix)
    if rest == name or not rest.isdigit() or (len(rest) > 1 and rest[0] == "0"):
        return None
    return int(rest)


def matches_prefix(*, name: str, prefix: str) -> bool:
    """Whether parameter or layer ``name`` lies under ``prefix`` (equal, or ``prefix`` + ``.`` + more)."""
    return name == prefix or name.startswith(prefix + ".")
