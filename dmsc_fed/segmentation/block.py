"""Block segmentation: the flat parameter vector cut into blocks, trained by sites with replication.

Implements "block-based segmentation" of draft-yang-dmsc-distributed-model-03, section
6.2.5: "smaller, independent chunks of computation" that ignore layer boundaries and
adapt to heterogeneous resources, each trained by sites and aggregated per block.

Cutting
    The model's parameters, flattened in order and concatenated, form one vector of
    ``N`` numbers. It is cut into blocks of ``block_size`` (the last one shorter) or
    into ``block_count`` blocks of near-equal size (the first ``N mod count`` one
    longer). A block records the parameter slices it covers.

Assigning (redundant computation, section 6.2.7)
    Every block is trained by exactly ``r`` distinct sites every round, and a site's
    share of the ``r * B`` block slots is proportional to its capacity (a GPU site
    takes more than a CPU site), no site holding a block twice:

    1. Quotas by water-filling: ``x_i = r B s_i / sum(s)``; a site whose ``x_i``
       exceeds ``B`` gets ``B`` and the rest is shared again among the others.
    2. Integer quotas ``q_i`` by largest remainder (ties: member order), summing to
       ``r B``, each at most ``B``.
    3. Wrap-around layout (McNaughton 1959): the sites' quotas laid end to end over
       ``r B`` slots, slot ``t`` training block ``t mod B``. A site's slots are
       consecutive and at most ``B`` long, so its blocks are distinct, and the ``r``
       slots of one block are ``B`` apart, so they belong to ``r`` distinct sites.

    The plan depends only on its inputs: no randomness.

Aggregating
    :func:`aggregate_blocks` averages each block over the sites that trained it,
    weighted (e.g. by sample count); it works for any segment keys, so business
    segments use it too.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation.names import block_segment

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class ParamSlice:
    """The part ``[start, stop)`` of a parameter's flattened values that lies in a block."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class Block:
    """One block of the flat parameter vector.

    Attributes
    ----------
    index
        Block id, 0-based, in vector order.
    offset
        Position of its first value in the flat vector.
    length
        Number of values.
    slices
        The parameter slices it covers, in vector order.
    sites
        The sites that train it, in member order.

    """

    index: int
    offset: int
    length: int
    slices: tuple[ParamSlice, ...]
    sites: tuple[str, ...]

    @property
    def name(self) -> str:
        """Segment name, ``block-<index>``."""
        return block_segment(self.index)


@dataclass(frozen=True)
class BlockPlan:
    """Blocks, and for every site the blocks it trains.

    Attributes
    ----------
    blocks
        All blocks, in vector order.
    assignment
        Site -> ids of the blocks it trains (ascending), for every site, in member order.
    replication
        Sites per block.
    total
        Length of the flat parameter vector.

    """

    blocks: tuple[Block, ...]
    assignment: Mapping[str, tuple[int, ...]]
    replication: int
    total: int

    def blocks_of(self, *, site: str) -> tuple[int, ...]:
        """Ids of the blocks ``site`` trains (KeyError for a site not in the plan)."""
        return self.assignment[site]

    def split(self, *, flat: NDArray[Any], blocks: Sequence[int] | None = None) -> dict[int, NDArray[Any]]:
        """The values of ``blocks`` (default: all) cut out of the flat vector (copies)."""
        if flat.shape != (self.total,):
            raise ValueError(f"the flat vector has shape {flat.shape}, the plan covers ({self.total},)")
        ids = range(len(self.blocks)) if blocks is None else blocks
        return {i: flat[self.blocks[i].offset : self.blocks[i].offset + self.blocks[i].length].copy() for i in ids}

    def merge(self, *, base: NDArray[Any], values: Mapping[int, NDArray[Any]]) -> NDArray[Any]:
        """A copy of flat vector ``base`` with the given blocks written over it."""
        if base.shape != (self.total,):
            raise ValueError(f"the flat vector has shape {base.shape}, the plan covers ({self.total},)")
        out = base.copy()
        for i, value in values.items():
            block = self.blocks[i]
            if value.shape != (block.length,):
                raise ValueError(f"block {i} has {block.length} values, got shape {value.shape}")
            out[block.offset : block.offset + block.length] = value
        return out


def block_bounds(*, total: int, block_size: int | None = None, block_count: int | None = None) -> list[tuple[int, int]]:
    """``(offset, length)`` of every block of a vector of ``total`` values.

    Exactly one of ``block_size`` (last block shorter) and ``block_count`` (near-equal
    blocks, the first ``total mod count`` one value longer) is given.
    """
    if total < 1:
        raise ConfigError(f"the model has {total} parameters: nothing to cut into blocks")
    if (block_size is None) == (block_count is None):
        raise ConfigError("block segmentation needs exactly one of block_size or block_count")
    if block_size is not None:
        if block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {block_size}")
        return [(off, min(block_size, total - off)) for off in range(0, total, block_size)]
    assert block_count is not None
    if not 1 <= block_count <= total:
        raise ConfigError(f"block_count = {block_count} must be between 1 and the model's {total} parameters")
    base, extra = divmod(total, block_count)
    bounds: list[tuple[int, int]] = []
    off = 0
    for i in range(block_count):
        length = base + (1 if i < extra else 0)
        bounds.append((off, length))
        off += length
    return bounds


def _quotas(*, num_blocks: int, capacities: Sequence[float], replication: int) -> list[int]:
    """Integer block counts per site: proportional to capacity, each at most ``num_blocks``, summing to ``r B``."""
    n = len(capacities)
    slots = replication * num_blocks
    share = [0.0] * n
    active = list(range(n))
    remaining = float(slots)
    while active:
        weight = sum(capacities[i] for i in active)
        over = [i for i in active if remaining * capacities[i] / weight > num_blocks]
        if not over:
            for i in active:
                share[i] = remaining * capacities[i] / weight
            break
        for i in over:
            share[i] = float(num_blocks)
        remaining -= num_blocks * len(over)
        active = [i for i in active if i not in over]
    quotas = [min(math.floor(x), num_blocks) for x in share]
    short = slots - sum(quotas)
    order = sorted((i for i in range(n) if quotas[i] < num_blocks), key=lambda i: (-(share[i] - quotas[i]), i))
    for i in order[:short]:
        quotas[i] += 1
    if sum(quotas) != slots:  # pragma: no cover - r <= n guarantees room for every slot
        raise ConfigError(f"cannot place {slots} block slots on {n} sites")
    return quotas


def assign_blocks(
    *, num_blocks: int, capacities: Mapping[str, float], replication: int = 1
) -> dict[str, tuple[int, ...]]:
    """Site -> the blocks it trains, every block on exactly ``replication`` distinct sites.

    Parameters
    ----------
    num_blocks
        ``B``, the number of blocks.
    capacities
        Site -> capacity (positive, e.g. relative throughput; a GPU-pool site has a
        larger one). Sites take block counts proportional to it.
    replication
        ``r``, distinct sites per block, ``1 <= r <= len(capacities)``.

    Raises
    ------
    ConfigError
        ``r`` out of range, no sites, or a capacity that is not positive and finite.

    """
    sites = list(capacities)
    caps = [float(capacities[s]) for s in sites]
    if num_blocks < 1:
        raise ConfigError(f"need at least one block, got {num_blocks}")
    if not sites:
        raise ConfigError("block segmentation needs at least one site")
    bad = [s for s, c in zip(sites, caps, strict=True) if not (math.isfinite(c) and c > 0)]
    if bad:
        raise ConfigError(f"site capacities must be positive and finite: {[(s, capacities[s]) for s in bad]}")
    if replication < 1:
        raise ConfigError(f"replication must be at least 1, got {replication}")
    if replication > len(sites):
        raise ConfigError(
            f"replication = {replication} is more than the {len(sites)} site(s): "
            f"every block must be trained by {replication} distinct sites"
        )
    quotas = _quotas(num_blocks=num_blocks, capacities=caps, replication=replication)
    out: dict[str, tuple[int, ...]] = {}
    start = 0
    for site, q in zip(sites, quotas, strict=True):
        out[site] = tuple(sorted((start + u) % num_blocks for u in range(q)))
        start += q
    return out


def _slices(
    *, offset: int, length: int, names: Sequence[str], starts: Sequence[int], sizes: Sequence[int]
) -> tuple[ParamSlice, ...]:
    out: list[ParamSlice] = []
    i = bisect_right(starts, offset) - 1
    end = offset + length
    while i < len(names) and starts[i] < end:
        lo, hi = max(offset, starts[i]), min(end, starts[i] + sizes[i])
        if hi > lo:
            out.append(ParamSlice(name=names[i], start=lo - starts[i], stop=hi - starts[i]))
        i += 1
    return tuple(out)


def plan_blocks(
    *,
    parameters: Mapping[str, Sequence[int]],
    capacities: Mapping[str, float],
    block_size: int | None = None,
    block_count: int | None = None,
    replication: int = 1,
) -> BlockPlan:
    """Cut the flat parameter vector into blocks and assign them to sites.

    Parameters
    ----------
    parameters
        Parameter name -> shape, in model order (e.g. ``{n: p.shape for n, p in
        model.named_parameters()}``); values are flattened in C order.
    capacities
        Site -> capacity, in member order.
    block_size, block_count
        Exactly one: values per block, or number of blocks.
    replication
        Distinct sites that train every block.

    Returns
    -------
    BlockPlan
        Blocks with their slices and sites, and the blocks of every site.

    Raises
    ------
    ConfigError
        An empty model, a negative dimension, bad block settings or capacities, or
        ``replication`` larger than the number of sites.

    """
    names = list(parameters)
    sizes: list[int] = []
    for name in names:
        shape = tuple(int(d) for d in parameters[name])
        if any(d < 0 for d in shape):
            raise ConfigError(f"parameter {name!r} has a negative dimension: {shape}")
        sizes.append(math.prod(shape))
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    total = sum(sizes)
    bounds = block_bounds(total=total, block_size=block_size, block_count=block_count)
    assignment = assign_blocks(num_blocks=len(bounds), capacities=capacities, replication=replication)
    holders: list[list[str]] = [[] for _ in bounds]
    for site, ids in assignment.items():
        for i in ids:
            holders[i].append(site)
    blocks = tuple(
        Block(
            index=i,
            offset=off,
            length=length,
            slices=_slices(offset=off, length=length, names=names, starts=starts, sizes=sizes),
            sites=tuple(holders[i]),
        )
        for i, (off, length) in enumerate(bounds)
    )
    return BlockPlan(blocks=blocks, assignment=MappingProxyType(assignment), replication=replication, total=total)


def _check_planned(*, plan: BlockPlan, site: str, key: object, value: NDArray[Any]) -> None:
    """Raise ValueError unless ``value`` is block ``key`` of ``plan``, assigned to ``site``, of its length."""
    if isinstance(key, bool) or not isinstance(key, int | np.integer) or not 0 <= int(key) < len(plan.blocks):
        raise ValueError(f"site {site!r} sent block {key!r}, which the plan does not have")
    block = plan.blocks[int(key)]
    if site not in block.sites:
        raise ValueError(f"site {site!r} sent block {key}, which it was not assigned")
    if value.shape != (block.length,):
        raise ValueError(f"site {site!r} sent block {key} of shape {value.shape}, expected ({block.length},)")


def aggregate_blocks(
    *,
    updates: Mapping[str, Mapping[K, NDArray[Any]]],
    weights: Mapping[str, float],
    plan: BlockPlan | None = None,
) -> dict[K, NDArray[Any]]:
    """Weighted average of every block over the sites that sent it.

    ``result[b] = sum_i w_i * x_i[b] / sum_i w_i`` over the sites ``i`` whose update
    holds block ``b``. Accumulates in float64 and returns each block in the dtype of
    its first update. A block that no site sent is absent from the result.

    Parameters
    ----------
    updates
        Site -> block id -> values (any keys work, e.g. business segment names).
    weights
        Site -> weight (finite, non-negative), e.g. its number of training samples.
    plan
        If given, every block id must be one of its blocks, of its length, and sent
        by a site that was assigned it.

    Raises
    ------
    ValueError
        A site without a weight, a bad weight, values of different shapes for one
        block, a block whose senders' weights sum to zero, or an update that does
        not fit ``plan``.

    """
    for site in updates:
        if site not in weights:
            raise ValueError(f"site {site!r} sent blocks but has no weight")
        w = weights[site]
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"weight of site {site!r} must be finite and non-negative, got {w}")
    senders: dict[K, list[str]] = {}
    for site, blocks in updates.items():
        for key, value in blocks.items():
            if plan is not None:
                _check_planned(plan=plan, site=site, key=key, value=value)
            senders.setdefault(key, []).append(site)
    out: dict[K, NDArray[Any]] = {}
    for key, sites in senders.items():
        first = updates[sites[0]][key]
        for site in sites[1:]:
            if updates[site][key].shape != first.shape:
                raise ValueError(
                    f"block {key!r}: site {site!r} sent shape {updates[site][key].shape}, "
                    f"site {sites[0]!r} sent {first.shape}"
                )
        total = float(sum(weights[s] for s in sites))
        if total <= 0:
            raise ValueError(f"block {key!r}: the weights of its sites {sites} sum to zero")
        acc = np.zeros(first.shape, dtype=np.float64)
        for site in sites:
            acc += (weights[site] / total) * np.asarray(updates[site][key], dtype=np.float64)
        out[key] = acc.astype(first.dtype)
    return out
