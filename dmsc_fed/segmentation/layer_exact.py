"""Exact layer segmentation of a chain: dynamic programming over cut points.

Finds the cut points of draft-yang-dmsc-distributed-model-03, section 6.2.5 ("layer-based
segmentation") that minimize the cost of :mod:`~dmsc_fed.segmentation.costs`:
``w_compute * max_k T_k + sum_j g(x_j) + const``, stages contiguous and in pipeline
order, cuts only where allowed.

The cost mixes a maximum (the bottleneck stage) with a sum (communication per cut), so
a plain prefix DP is not exact: the best prefix for the sum is not the best for the
maximum. The solver walks the Pareto front of (bottleneck, communication) with the
epsilon-constraint method (Haimes, Lasdon and Wismer 1971):

1. ``threshold = inf``.
2. A DP over ``(stage k, last layer l)`` finds, among plans whose every stage time is
   strictly below ``threshold``, the least communication, ties broken by the least
   bottleneck (a lexicographic order, which keeps the principle of optimality: a
   prefix with less communication, or equal communication and a lower maximum, is
   never worse for any completion).
3. The plan found has bottleneck ``b``; every plan with bottleneck ``>= b`` costs at
   least as much, so the next round looks only below: ``threshold = b``.
4. Stop when no plan is left, or when even the smallest possible bottleneck (the
   min-max partition, one more DP) plus the current communication cannot beat the
   best cost found.

Each round is one pass of ``O(K L^2)`` (vectorized with numpy, ``O(L^2)`` memory); the
number of rounds is the number of Pareto points visited, a few to a few hundred in
practice (reported as :attr:`LayerPlan.iterations`). The stage times compared against
the threshold are computed with the same arithmetic as
:func:`~dmsc_fed.segmentation.costs.stage_times`, so ties are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation.costs import Chain, CutCost, LayerPlan, cut_cost

_INF = np.inf


@dataclass(frozen=True)
class _Best:
    """Per end layer ``l`` of stage ``k``: least communication, its bottleneck and the previous end."""

    comm: NDArray[np.float64]
    bottleneck: NDArray[np.float64]
    parent: NDArray[np.int64]


def _sums(chain: Chain) -> NDArray[np.float64]:
    """``S[j, l] = c_j + ... + c_l`` for ``j <= l`` (``inf`` below the diagonal)."""
    p = chain.prefix
    s: NDArray[np.float64] = p[None, 1:] - p[:-1, None]
    s[np.tril_indices(chain.num_layers, k=-1)] = _INF
    return s


def _constrained(
    *, chain: Chain, sums: NDArray[np.float64], comm: NDArray[np.float64], threshold: float
) -> tuple[int, ...] | None:
    """The plan with least ``comm`` (ties: least bottleneck) whose stage times are all below ``threshold``."""
    n, k_stages = chain.num_layers, chain.num_stages
    cut_comm = np.where(chain.allowed, comm, _INF)  # comm of a cut right after layer l, l < L - 1
    t0 = sums[0] / chain.capacities[0]
    ok0 = t0 < threshold
    if k_stages == 1:
        return () if ok0[n - 1] else None
    stages: list[_Best] = []
    first_comm = np.full(n, _INF)
    first_comm[: n - 1] = np.where(ok0[: n - 1], cut_comm, _INF)
    prev = _Best(comm=first_comm, bottleneck=np.where(ok0, t0, _INF), parent=np.full(n, -1, dtype=np.int64))
    stages.append(prev)
    for k in range(1, k_stages):
        last = k == k_stages - 1
        cols = slice(n - 1, n) if last else slice(0, n - 1)
        # stage k runs layers j + 1 .. l after the previous stage ended at j
        times = sums[1:, cols] / chain.capacities[k]  # (n - 1, cols): row j is start j + 1
        ok = (times < threshold) & np.isfinite(prev.comm[: n - 1, None])
        cand = np.where(ok, prev.comm[: n - 1, None], _INF)
        least = cand.min(axis=0)
        tied = ok & (cand == least[None, :])
        bott = np.where(tied, np.maximum(prev.bottleneck[: n - 1, None], times), _INF)
        parent = bott.argmin(axis=0).astype(np.int64)
        best_bott = bott.min(axis=0)
        new_comm = np.full(n, _INF)
        new_bott = np.full(n, _INF)
        new_parent = np.full(n, -1, dtype=np.int64)
        if last:
            new_comm[n - 1], new_bott[n - 1], new_parent[n - 1] = least[0], best_bott[0], parent[0]
        else:
            new_comm[: n - 1] = least + cut_comm
            new_bott[: n - 1] = best_bott
            new_parent[: n - 1] = parent
        prev = _Best(comm=new_comm, bottleneck=new_bott, parent=new_parent)
        stages.append(prev)
    if not np.isfinite(prev.comm[n - 1]):
        return None
    cuts: list[int] = []
    end = n - 1
    for k in range(k_stages - 1, 0, -1):
        end = int(stages[k].parent[end])
        cuts.append(end)
    return tuple(reversed(cuts))


def min_bottleneck(*, chain: Chain) -> float:
    """The least possible ``max_k T_k`` over all allowed plans (the min-max partition)."""
    plan = _constrained(chain=chain, sums=_sums(chain), comm=np.zeros(chain.num_layers - 1), threshold=_INF)
    if plan is None:  # pragma: no cover - make_chain guarantees a feasible plan
        raise ConfigError("no plan satisfies the allowed cut positions")
    return cut_cost(chain=chain, cuts=plan).bottleneck


def solve_exact(*, chain: Chain, max_rounds: int = 1_000_000) -> LayerPlan:
    """The optimal cut plan for ``chain`` under :func:`~dmsc_fed.segmentation.costs.cut_cost`.

    Parameters
    ----------
    chain
        The cutting problem (:func:`~dmsc_fed.segmentation.costs.make_chain`).
    max_rounds
        Safety bound on threshold rounds; reaching it raises instead of returning a
        plan that might not be optimal.

    Returns
    -------
    LayerPlan
        The optimal plan (``solver = "exact"``, ``iterations`` = threshold rounds);
        among optimal plans, the one with the least communication.

    Raises
    ------
    ConfigError
        ``max_rounds`` was reached.

    """
    sums = _sums(chain)
    comm = chain.cut_comm
    weight = chain.weights.compute
    floor = min_bottleneck(chain=chain) if weight > 0 else 0.0
    threshold = _INF
    best: CutCost | None = None
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        plan = _constrained(chain=chain, sums=sums, comm=comm, threshold=threshold)
        if plan is None:
            break
        cost = cut_cost(chain=chain, cuts=plan)
        if best is None or cost.total < best.total:
            best = cost
        plan_comm = float(sum(comm[x] for x in plan))
        if weight * floor + plan_comm + chain.latency_term >= best.total or weight == 0:
            break
        threshold = cost.bottleneck
    else:
        raise ConfigError(f"the exact layer solver did not finish in {max_rounds} rounds")
    if best is None:  # pragma: no cover - make_chain guarantees a feasible plan
        raise ConfigError("no plan satisfies the allowed cut positions")
    return LayerPlan(cuts=best.cuts, cost=best, solver="exact", iterations=rounds)
