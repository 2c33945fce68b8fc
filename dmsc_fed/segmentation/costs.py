"""Cost model of layer segmentation: a chain of layers cut into contiguous pipeline stages.

Layer-based segmentation (draft-yang-dmsc-distributed-model-03, section 6.2.5) picks
cut points "by considering factors like computational load, inter-node communication
overhead, and overall network latency". This module states that cost; the exact
solver (:mod:`~dmsc_fed.segmentation.layer_exact`) and the tabu search
(:mod:`~dmsc_fed.segmentation.layer_tabu`) both minimize it and score plans with
:func:`cut_cost` only, so their figures are comparable to the last bit.

The model
---------
A chain of ``L`` layers; layer ``l`` costs ``c_l`` to compute (FLOPs, parameter count,
measured seconds on a unit-speed machine) and, when a cut falls right after it, sends
``a_l`` bytes of activations (and, backwards, gradients) to the next stage. ``K``
stages run in pipeline order on sites of capacity ``s_k`` (compute per unit time,
heterogeneous: a GPU site has a larger ``s_k``). A plan is ``K - 1`` cut positions
``x_1 < ... < x_{K-1}`` ("cut after layer ``x_j``"); stage ``k`` holds layers
``x_k + 1 .. x_{k+1}`` (with ``x_0 = -1``, ``x_K = L - 1``). Its cost is::

    cost(x) = w_compute       * max_k T_k                     (bottleneck: the slowest stage sets the pace)
            + w_communication * sum_j a_{x_j} / bandwidth     (transfer time across the cuts)
            + w_latency       * (K - 1) * cut_latency         (fixed latency per cut)

    T_k = (sum of c_l over the layers of stage k) / s_k

The latency term is the same for every plan with ``K`` stages; it makes the cost of
plans with different numbers of stages (or sites) comparable.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dmsc_fed.errors import ConfigError


@dataclass(frozen=True)
class CostWeights:
    """Weights of the bottleneck, communication and latency terms (non-negative, not all zero)."""

    compute: float = 1.0
    communication: float = 1.0
    latency: float = 1.0


@dataclass(frozen=True)
class Chain:
    """A validated cutting problem; build it with :func:`make_chain`.

    Attributes
    ----------
    compute
        ``c_l``, shape ``(L,)``.
    activation_bytes
        ``a_l``, bytes crossing a cut right after layer ``l``, shape ``(L - 1,)``.
    capacities
        ``s_k`` of the site running stage ``k``, shape ``(K,)``.
    allowed
        Whether a cut may fall right after layer ``l``, shape ``(L - 1,)``.
    weights, bandwidth, cut_latency
        The remaining terms of the cost.
    prefix
        ``prefix[i] = c_0 + ... + c_{i-1}``, shape ``(L + 1,)``; stage times are
        differences of it divided by a capacity.

    """

    compute: NDArray[np.float64]
    activation_bytes: NDArray[np.float64]
    capacities: NDArray[np.float64]
    allowed: NDArray[np.bool_]
    weights: CostWeights
    bandwidth: float
    cut_latency: float
    prefix: NDArray[np.float64] = field(repr=False)

    @property
    def num_layers(self) -> int:
        """``L``."""
        return int(self.compute.shape[0])

    @property
    def num_stages(self) -> int:
        """``K``."""
        return int(self.capacities.shape[0])

    @property
    def cut_positions(self) -> NDArray[np.int64]:
        """Layer indices after which a cut may fall, ascending."""
        return np.flatnonzero(self.allowed).astype(np.int64)

    @property
    def cut_comm(self) -> NDArray[np.float64]:
        """Weighted communication cost of a cut after each layer: ``w_communication * a_l / bandwidth``."""
        return self.weights.communication * (self.activation_bytes / self.bandwidth)

    @property
    def latency_term(self) -> float:
        """``w_latency * (K - 1) * cut_latency``, the same for every plan."""
        return self.weights.latency * (self.num_stages - 1) * self.cut_latency


@dataclass(frozen=True)
class CutCost:
    """The cost of one plan, term by term (unweighted terms, weighted total).

    Attributes
    ----------
    cuts
        The plan: a cut right after each of these layers.
    stage_times
        ``T_k`` per stage.
    bottleneck
        ``max_k T_k``.
    transfer
        ``sum_j a_{x_j} / bandwidth``.
    latency
        ``(K - 1) * cut_latency``.
    total
        The weighted cost that the planners minimize.

    """

    cuts: tuple[int, ...]
    stage_times: tuple[float, ...]
    bottleneck: float
    transfer: float
    latency: float
    total: float


@dataclass(frozen=True)
class LayerPlan:
    """A layer segmentation: where the chain is cut, what it costs, how it was found.

    Attributes
    ----------
    cuts
        Cut right after each of these layers (ascending, ``K - 1`` of them).
    cost
        Its cost by :func:`cut_cost`.
    solver
        ``exact`` or ``tabu``.
    iterations
        Threshold rounds of the exact solver, or moves of the tabu search.
    gap
        ``tabu cost / exact cost - 1`` when the tabu plan was checked against the
        exact solver, else None.

    """

    cuts: tuple[int, ...]
    cost: CutCost
    solver: str
    iterations: int
    gap: float | None = None

    def stage_ranges(self, *, num_layers: int) -> tuple[tuple[int, int], ...]:
        """``(first, last)`` layer index of every stage, inclusive."""
        bounds = (-1, *self.cuts, num_layers - 1)
        return tuple((bounds[k] + 1, bounds[k + 1]) for k in range(len(bounds) - 1))


def _vector(name: str, values: ArrayLike, *, length: int | None = None, positive: bool = False) -> NDArray[np.float64]:
    arr = np.array(values, dtype=np.float64, copy=True)
    if arr.ndim != 1:
        raise ConfigError(f"{name} must be a flat sequence of numbers, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ConfigError(f"{name} has {arr.shape[0]} entries, expected {length}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} must be finite, got {arr.tolist()[:8]}")
    if positive and np.any(arr <= 0):
        raise ConfigError(f"{name} must be positive, got {arr.tolist()[:8]}")
    if not positive and np.any(arr < 0):
        raise ConfigError(f"{name} must be non-negative, got {arr.tolist()[:8]}")
    arr.setflags(write=False)
    return arr


def make_chain(
    *,
    compute: ArrayLike,
    activation_bytes: ArrayLike,
    capacities: ArrayLike,
    weights: CostWeights | None = None,
    bandwidth: float = 1.0,
    cut_latency: float = 0.0,
    allowed_cuts: Sequence[int] | None = None,
) -> Chain:
    """Validate the numbers of a cutting problem and freeze them in a :class:`Chain`.

    Parameters
    ----------
    compute
        Per-layer compute cost ``c_l`` (``L`` non-negative numbers).
    activation_bytes
        Bytes crossing a cut right after layer ``l`` (``L - 1`` non-negative numbers).
    capacities
        Capacity of the site running each stage, in pipeline order (``K`` positive numbers).
    weights
        Weights of the cost terms (default: all 1).
    bandwidth
        Bytes per unit time on a link between consecutive stages (positive).
    cut_latency
        Fixed time per cut (non-negative).
    allowed_cuts
        Layer indices after which a cut may fall (default: any of ``0 .. L - 2``).

    Raises
    ------
    ConfigError
        Bad numbers, mismatched lengths, or fewer allowed cut positions than ``K - 1``.

    """
    c = _vector("compute", compute)
    if c.shape[0] < 1:
        raise ConfigError("a chain needs at least one layer")
    a = _vector("activation_bytes", activation_bytes, length=c.shape[0] - 1)
    s = _vector("capacities", capacities, positive=True)
    if s.shape[0] < 1:
        raise ConfigError("a chain needs at least one stage (one capacity)")
    w = weights if weights is not None else CostWeights()
    for name, value in (("compute", w.compute), ("communication", w.communication), ("latency", w.latency)):
        if not (np.isfinite(value) and value >= 0):
            raise ConfigError(f"cost weight {name} must be finite and non-negative, got {value}")
    if not (np.isfinite(bandwidth) and bandwidth > 0):
        raise ConfigError(f"bandwidth must be positive and finite, got {bandwidth}")
    if not (np.isfinite(cut_latency) and cut_latency >= 0):
        raise ConfigError(f"cut_latency must be non-negative and finite, got {cut_latency}")
    allowed = np.ones(c.shape[0] - 1, dtype=np.bool_)
    if allowed_cuts is not None:
        allowed[:] = False
        for p in allowed_cuts:
            if not 0 <= int(p) <= c.shape[0] - 2:
                raise ConfigError(f"allowed cut position {p} is outside 0 .. {c.shape[0] - 2} for {c.shape[0]} layers")
            allowed[int(p)] = True
    if int(allowed.sum()) < s.shape[0] - 1:
        raise ConfigError(
            f"{s.shape[0]} stages need {s.shape[0] - 1} cut positions, only {int(allowed.sum())} are allowed "
            f"in a chain of {c.shape[0]} layers"
        )
    allowed.setflags(write=False)
    prefix = np.concatenate([[0.0], np.cumsum(c)])
    prefix.setflags(write=False)
    return Chain(
        compute=c,
        activation_bytes=a,
        capacities=s,
        allowed=allowed,
        weights=w,
        bandwidth=float(bandwidth),
        cut_latency=float(cut_latency),
        prefix=prefix,
    )


def check_cuts(*, chain: Chain, cuts: Sequence[int]) -> tuple[int, ...]:
    """``cuts`` as a tuple after checking it is a valid plan for ``chain``.

    Raises
    ------
    ConfigError
        Wrong number of cuts, not strictly ascending, or a cut at a position that
        is not allowed.

    """
    plan = tuple(int(x) for x in cuts)
    if len(plan) != chain.num_stages - 1:
        raise ConfigError(f"{chain.num_stages} stages need {chain.num_stages - 1} cuts, got {len(plan)}: {plan}")
    if any(b <= a for a, b in itertools.pairwise(plan)):
        raise ConfigError(f"cuts must be strictly ascending (no empty stage), got {plan}")
    for x in plan:
        if not 0 <= x <= chain.num_layers - 2 or not chain.allowed[x]:
            raise ConfigError(f"a cut after layer {x} is not allowed")
    return plan


def stage_times(*, chain: Chain, cuts: Sequence[int]) -> NDArray[np.float64]:
    """``T_k`` of every stage: its layers' compute divided by its site's capacity."""
    ends = np.array([*cuts, chain.num_layers - 1], dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    result: NDArray[np.float64] = (chain.prefix[ends + 1] - chain.prefix[starts]) / chain.capacities
    return result


def cut_cost(*, chain: Chain, cuts: Sequence[int]) -> CutCost:
    """The cost of plan ``cuts`` (the formula in the module docstring)."""
    plan = check_cuts(chain=chain, cuts=cuts)
    times = stage_times(chain=chain, cuts=plan)
    bottleneck = float(times.max())
    comm = chain.cut_comm
    weighted_comm = float(sum(comm[x] for x in plan))
    transfer = float(sum(chain.activation_bytes[x] for x in plan)) / chain.bandwidth
    latency = (chain.num_stages - 1) * chain.cut_latency
    total = chain.weights.compute * bottleneck + weighted_comm + chain.latency_term
    return CutCost(
        cuts=plan,
        stage_times=tuple(float(t) for t in times),
        bottleneck=bottleneck,
        transfer=transfer,
        latency=latency,
        total=float(total),
    )
