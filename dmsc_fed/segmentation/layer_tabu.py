"""Tabu search for layer segmentation: move cuts, forbid moving straight back.

The heuristic that draft-yang-dmsc-distributed-model-03, section 6.2.5 names for choosing
layer cut points, after Glover ("Future paths for integer programming and links to
artificial intelligence", 1986; "Tabu Search - Part I", 1989), over the cost of
:mod:`~dmsc_fed.segmentation.costs` (heterogeneous site capacities, bottleneck plus
communication plus latency).

The search
----------
A plan is ``K - 1`` ascending indices into the allowed cut positions.

- Start: the capacity-proportional split, each cut at the allowed position whose
  cumulative compute is closest to its site's share.
- Moves (:func:`_moves`): a *group shift* moves the consecutive cuts ``j .. j2`` by the
  same number of positions, between cut ``j - 1`` and cut ``j2 + 1`` (``j == j2`` is
  the plain single-cut move); a *relocation* removes one cut and adds one at a free
  position beyond its neighbours, so the cuts in between move over by one slot. With
  heterogeneous sites the stage order is fixed, so handing a heavy layer to a fast
  site several stages away takes many cuts moving together: single-cut moves alone
  stall in such local optima (measured: up to 20% above the optimum at 25-50 layers).
- When there are more than ``neighbourhood`` moves, that many are drawn with the
  seeded generator; all drawn moves are scored at once (vectorized, ``O(K)`` each).
- Tabu: a move is forbidden when it puts a cut back on a position that cut left
  during the last ``tenure`` iterations, unless it gives a plan better than the best
  so far (aspiration).
- The best admissible move is made even when it is worse; ties go to the plan with
  the smaller sum of squared stage times (the more balanced one, so the search
  drifts along plateaus of equal bottleneck towards plans that can improve), then
  to the first move listed. The best plan seen is returned, scored by
  :func:`~dmsc_fed.segmentation.costs.cut_cost`.
- Diversification: after ``patience`` iterations without a new best, the search
  restarts from the best plan with every cut shifted by a random number of allowed
  positions.

Everything random comes from ``numpy.random.default_rng(seed)``: the same chain and
parameters give the same plan. ``verify=True`` also runs the exact solver
(:func:`~dmsc_fed.segmentation.layer_exact.solve_exact`), returns the better of the
two plans (the exact one is the fallback) and records the gap in :attr:`LayerPlan.gap`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation.costs import Chain, LayerPlan, cut_cost
from dmsc_fed.segmentation.layer_exact import solve_exact

_IMPROVES = 1e-12


def proportional_start(*, chain: Chain) -> tuple[int, ...]:
    """Cuts that give each stage a share of the compute proportional to its site's capacity."""
    pos = chain.cut_positions
    k_cuts = chain.num_stages - 1
    shares = np.cumsum(chain.capacities)[:-1] / chain.capacities.sum()
    targets = shares * chain.prefix[-1]
    reach = chain.prefix[pos + 1]  # cumulative compute up to and including each allowed position
    chosen: list[int] = []
    lo = 0
    for j in range(k_cuts):
        hi = pos.shape[0] - (k_cuts - j)  # leave room for the remaining cuts
        window = reach[lo : hi + 1]
        i = lo + int(np.argmin(np.abs(window - targets[j])))
        chosen.append(i)
        lo = i + 1
    return tuple(int(pos[i]) for i in chosen)


def _moves(*, idx: NDArray[np.int64], size: int) -> NDArray[np.int64]:
    """Every neighbour of plan ``idx`` (indices into the allowed positions), one row per move.

    Two kinds of move:

    - group shift: the consecutive cuts ``j .. j2`` move by the same number of allowed
      positions, staying strictly between cut ``j - 1`` and cut ``j2 + 1`` (``j == j2``
      is the single-cut move);
    - relocation: one cut leaves and a cut appears at a free position outside its
      neighbours, so the cuts in between move over by one slot.
    """
    k = idx.shape[0]
    lows = np.concatenate([[0], idx[:-1] + 1]) - idx  # least shift of cut j
    highs = np.concatenate([idx[1:] - 1, [size - 1]]) - idx  # largest shift of cut j
    first, last = np.triu_indices(k)
    deltas = np.arange(-size + 1, size, dtype=np.int64)
    ok = (deltas[None, :] >= lows[first][:, None]) & (deltas[None, :] <= highs[last][:, None]) & (deltas != 0)
    pair, which = np.nonzero(ok)
    cols = np.arange(k)
    group = (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])
    shifts = idx[None, :] + deltas[which][:, None] * group[pair]
    free = np.setdiff1d(np.arange(size, dtype=np.int64), idx)
    before = np.concatenate([[-1], idx[:-1]])
    after = np.concatenate([idx[1:], [size]])
    outside = (free[None, :] < before[:, None]) | (free[None, :] > after[:, None])
    gone, new = np.nonzero(outside)
    keep = np.array([np.delete(cols, j) for j in range(k)], dtype=np.int64).reshape(k, k - 1)
    relocated = np.sort(np.concatenate([idx[keep[gone]], free[new][:, None]], axis=1), axis=1)
    return np.concatenate([shifts, relocated]).astype(np.int64)


def _scores(
    *, chain: Chain, pos: NDArray[np.int64], plans: NDArray[np.int64], comm: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Cost of every plan (rows of indices into ``pos``) and, to break ties, its sum of squared stage times."""
    n = chain.num_layers
    ends = np.concatenate([pos[plans], np.full((plans.shape[0], 1), n - 1, dtype=np.int64)], axis=1)
    starts = np.concatenate([np.zeros((plans.shape[0], 1), dtype=np.int64), ends[:, :-1] + 1], axis=1)
    times = (chain.prefix[ends + 1] - chain.prefix[starts]) / chain.capacities[None, :]
    total = chain.weights.compute * times.max(axis=1) + comm[pos[plans]].sum(axis=1) + chain.latency_term
    return total, (times**2).sum(axis=1)


def _kick(*, idx: NDArray[np.int64], size: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Shift every cut by up to a few allowed positions at random, keeping them ascending and distinct."""
    k = idx.shape[0]
    spread = max(1, size // (2 * (k + 1)))
    moved = np.clip(idx + rng.integers(-spread, spread + 1, size=k), 0, size - 1)
    moved = np.sort(moved)
    for j in range(k):  # repair: strictly ascending, room left for the cuts after j
        low = moved[j - 1] + 1 if j > 0 else 0
        moved[j] = min(max(moved[j], low), size - (k - j))
    return moved.astype(np.int64)


def solve_tabu(
    *,
    chain: Chain,
    iterations: int = 300,
    tenure: int = 7,
    neighbourhood: int = 1024,
    seed: int = 0,
    patience: int | None = None,
    verify: bool = False,
) -> LayerPlan:
    """Tabu search for a cut plan of ``chain``; deterministic for a given ``seed``.

    Parameters
    ----------
    chain
        The cutting problem (:func:`~dmsc_fed.segmentation.costs.make_chain`).
    iterations
        Moves made.
    tenure
        Iterations during which a cut may not return to a position it left.
    neighbourhood
        Moves scored per iteration at most (drawn at random when there are more).
    seed
        Seed of every random choice.
    patience
        Iterations without a new best before a restart from the best plan (default:
        ``max(20, iterations // 10)``).
    verify
        Also run the exact solver, return the better plan and record the gap.

    Returns
    -------
    LayerPlan
        ``solver = "tabu"`` (or ``"exact"`` when ``verify`` found a better plan),
        ``iterations`` = moves made, ``gap`` set when ``verify``.

    """
    if iterations < 1 or tenure < 0 or neighbourhood < 1:
        raise ConfigError(
            f"tabu search needs iterations >= 1, tenure >= 0 and neighbourhood >= 1, "
            f"got {iterations}, {tenure}, {neighbourhood}"
        )
    if chain.num_stages == 1:
        return LayerPlan(cuts=(), cost=cut_cost(chain=chain, cuts=()), solver="tabu", iterations=0)
    rng = np.random.default_rng(seed)
    patience = patience if patience is not None else max(20, iterations // 10)
    pos = chain.cut_positions
    comm = chain.cut_comm
    index_of = {int(x): i for i, x in enumerate(pos)}
    idx = np.array([index_of[x] for x in proportional_start(chain=chain)], dtype=np.int64)
    best_idx = idx.copy()
    best_total = cut_cost(chain=chain, cuts=pos[idx].tolist()).total
    tabu_until = np.zeros((chain.num_stages - 1, pos.shape[0]), dtype=np.int64)
    stale = 0
    moves = 0
    for it in range(1, iterations + 1):
        plans = _moves(idx=idx, size=pos.shape[0])
        if plans.shape[0] == 0:
            break
        if plans.shape[0] > neighbourhood:
            plans = plans[np.sort(rng.choice(plans.shape[0], size=neighbourhood, replace=False))]
        total, spread = _scores(chain=chain, pos=pos, plans=plans, comm=comm)
        moved = plans != idx[None, :]
        until = np.where(moved, tabu_until[np.arange(idx.shape[0])[None, :], plans], 0).max(axis=1)
        allowed = (until < it) | (total < best_total - _IMPROVES * abs(best_total))
        if not allowed.any():
            allowed = until == until.min()
        order = np.lexsort((spread, np.where(allowed, total, np.inf)))
        choice = int(order[0])
        left = np.flatnonzero(moved[choice])
        tabu_until[left, idx[left]] = it + tenure
        idx = plans[choice].copy()
        moves += 1
        if total[choice] < best_total - _IMPROVES * abs(best_total):
            best_total, best_idx, stale = float(total[choice]), idx.copy(), 0
        else:
            stale += 1
        if stale >= patience:
            idx = _kick(idx=best_idx, size=pos.shape[0], rng=rng)
            tabu_until[:] = 0
            stale = 0
    plan = LayerPlan(
        cuts=tuple(int(x) for x in pos[best_idx]),
        cost=cut_cost(chain=chain, cuts=pos[best_idx].tolist()),
        solver="tabu",
        iterations=moves,
    )
    if not verify:
        return plan
    exact = solve_exact(chain=chain)
    gap = plan.cost.total / exact.cost.total - 1.0 if exact.cost.total > 0 else 0.0
    better = exact if exact.cost.total < plan.cost.total else plan
    return LayerPlan(cuts=better.cuts, cost=better.cost, solver=better.solver, iterations=moves, gap=gap)
