from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation import (
    Chain,
    CostWeights,
    LayerPlan,
    ModelProfile,
    Resources,
    cut_cost,
    make_chain,
    min_bottleneck,
    parse_segmentation,
    plan_segmentation,
    proportional_start,
    solve_exact,
    solve_tabu,
)
from dmsc_fed.segmentation.registry import group_sites, plan_layer_mode


def _random_chain(rng: np.random.Generator, layers: int, stages: int, *, restrict: bool = False) -> Chain:
    compute = rng.lognormal(0.0, 1.0, layers)
    activations = rng.lognormal(0.0, 1.0, layers - 1) * compute.sum() / stages * rng.choice([0.02, 0.1, 0.5])
    capacities = rng.choice([1.0, 1.5, 4.0, 8.0], stages) * rng.uniform(0.8, 1.2, stages)
    allowed = None
    if restrict:
        k = int(rng.integers(stages - 1, layers))
        allowed = sorted(rng.choice(layers - 1, size=k, replace=False).tolist())
    return make_chain(
        compute=compute,
        activation_bytes=activations,
        capacities=capacities,
        weights=CostWeights(compute=1.0, communication=float(rng.uniform(0.0, 2.0)), latency=1.0),
        bandwidth=float(rng.uniform(0.5, 2.0)),
        cut_latency=0.1,
        allowed_cuts=allowed,
    )


def _brute_force(chain: Chain) -> float:
    positions = chain.cut_positions.tolist()
    return min(cut_cost(chain=chain, cuts=c).total for c in itertools.combinations(positions, chain.num_stages - 1))


def test_cost_hand_computed() -> None:
    chain = make_chain(
        compute=[1, 2, 3, 4],
        activation_bytes=[10, 20, 30],
        capacities=[1, 2],
        weights=CostWeights(compute=1.0, communication=0.1, latency=2.0),
        bandwidth=2.0,
        cut_latency=0.5,
    )
    # cut after layer 1: stages [1+2]/1 = 3 and [3+4]/2 = 3.5; transfer 20/2 = 10; latency 1 * 0.5
    cost = cut_cost(chain=chain, cuts=[1])
    assert cost.stage_times == (3.0, 3.5) and cost.bottleneck == 3.5
    assert cost.transfer == 10.0 and cost.latency == 0.5
    assert cost.total == pytest.approx(1.0 * 3.5 + 0.1 * 10.0 + 2.0 * 0.5)
    # cut after layer 0: 1/1 and 9/2 -> 4.5 + 0.1 * 5 + 1 = 6; after layer 2: 6/1 and 4/2 -> 6 + 0.1 * 15 + 1 = 8.5
    assert cut_cost(chain=chain, cuts=[0]).total == pytest.approx(6.0)
    assert cut_cost(chain=chain, cuts=[2]).total == pytest.approx(8.5)
    exact = solve_exact(chain=chain)
    assert exact.cuts == (1,) and exact.iterations >= 2  # the least-communication plan (cut 0) is not the best
    assert solve_tabu(chain=chain).cuts == (1,)


def test_exact_prefers_less_communication_at_equal_bottleneck() -> None:
    # two cuts balance the stages equally well; the one crossing fewer bytes wins
    chain = make_chain(compute=[1, 1, 0, 1, 1], activation_bytes=[5, 3, 1, 5], capacities=[1, 1])
    assert solve_exact(chain=chain).cuts == (2,)
    assert min_bottleneck(chain=chain) == 2.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"compute": [1, 2], "activation_bytes": [1, 1], "capacities": [1]}, "activation_bytes has 2 entries"),
        ({"compute": [1, -2], "activation_bytes": [1], "capacities": [1]}, "compute must be non-negative"),
        ({"compute": [1, np.nan], "activation_bytes": [1], "capacities": [1]}, "compute must be finite"),
        ({"compute": [1, 2], "activation_bytes": [1], "capacities": [1, 0]}, "capacities must be positive"),
        ({"compute": [1, 2], "activation_bytes": [1], "capacities": [1, 1, 1]}, "3 stages need 2 cut positions"),
        ({"compute": [1, 2, 3], "activation_bytes": [1, 1], "capacities": [1, 1], "allowed_cuts": [2]}, "outside"),
        ({"compute": [], "activation_bytes": [], "capacities": [1]}, "at least one layer"),
        ({"compute": [1, 2], "activation_bytes": [1], "capacities": [1], "bandwidth": 0}, "bandwidth"),
    ],
)
def test_bad_chains_are_config_errors(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        make_chain(**kwargs)


@pytest.mark.parametrize("cuts", [[0, 0], [2, 1], [3], [0, 5]])
def test_invalid_plans_are_rejected(cuts: list[int]) -> None:
    chain = make_chain(compute=[1] * 6, activation_bytes=[1] * 5, capacities=[1, 1, 1], allowed_cuts=[0, 1, 2, 3])
    with pytest.raises(ConfigError):
        cut_cost(chain=chain, cuts=cuts)


def test_exact_solver_matches_brute_force_on_tiny_chains() -> None:
    rng = np.random.default_rng(2024)
    for _ in range(150):
        layers = int(rng.integers(2, 10))
        stages = int(rng.integers(1, min(layers, 4) + 1))
        chain = _random_chain(rng, layers, stages, restrict=bool(rng.random() < 0.4))
        plan = solve_exact(chain=chain)
        assert plan.cost.total == pytest.approx(_brute_force(chain), rel=1e-12)
        assert all(chain.allowed[c] for c in plan.cuts)


def test_tabu_equals_exact_on_random_small_chains() -> None:
    rng = np.random.default_rng(7)
    for seed in range(50):
        chain = _random_chain(rng, int(rng.integers(5, 16)), int(rng.integers(2, 5)), restrict=seed % 5 == 0)
        exact = solve_exact(chain=chain)
        tabu = solve_tabu(chain=chain, iterations=100, seed=seed)
        assert tabu.solver == "tabu"
        assert tabu.cost.total == pytest.approx(exact.cost.total, rel=1e-9), f"instance {seed}"


def test_tabu_is_deterministic_and_verify_reports_the_gap() -> None:
    chain = _random_chain(np.random.default_rng(3), 60, 5)
    a = solve_tabu(chain=chain, iterations=60, neighbourhood=50, seed=11)
    b = solve_tabu(chain=chain, iterations=60, neighbourhood=50, seed=11)
    assert a == b and a.gap is None
    checked = solve_tabu(chain=chain, iterations=60, neighbourhood=50, seed=11, verify=True)
    exact = solve_exact(chain=chain)
    assert checked.gap == pytest.approx(a.cost.total / exact.cost.total - 1.0)
    assert checked.cost.total == pytest.approx(min(a.cost.total, exact.cost.total))


def test_proportional_start_follows_capacities() -> None:
    chain = make_chain(compute=[1] * 12, activation_bytes=[0] * 11, capacities=[1, 2, 3])
    # shares 2, 4, 6 layers
    assert proportional_start(chain=chain) == (1, 5)


def test_single_stage_has_no_cut() -> None:
    chain = make_chain(compute=[1, 2, 3], activation_bytes=[1, 1], capacities=[2])
    for plan in (solve_exact(chain=chain), solve_tabu(chain=chain)):
        assert plan.cuts == () and plan.cost.total == 3.0


def test_layer_mode_through_the_registry() -> None:
    spec = parse_segmentation(
        data={"mode": "layer", "layer": {"stages": 3, "cut_ranges": [["l1", "l6"]], "solver": "exact"}}
    )
    model = ModelProfile.of(layers=[f"l{i}" for i in range(10)], layer_compute=[1.0] * 10, activation_bytes=[0.0] * 9)
    plan = plan_segmentation(spec=spec, model=model, resources=Resources(capacities={"cpu": 1, "gpu": 4, "cpu2": 1}))
    assert plan.segments == ("stage-0", "stage-1", "stage-2")
    assert plan.sites == {"stage-0": ("cpu",), "stage-1": ("gpu",), "stage-2": ("cpu2",)}
    assert isinstance(plan.detail, LayerPlan) and all(1 <= c <= 6 for c in plan.detail.cuts)
    tabu = plan_segmentation(
        spec=spec.model_copy(update={"layer": spec.layer_spec.model_copy(update={"solver": "tabu"})}),
        model=model,
        resources=Resources(capacities={"cpu": 1, "gpu": 4, "cpu2": 1}),
    )
    assert isinstance(tabu.detail, LayerPlan)
    assert tabu.detail.cost.total == pytest.approx(plan.detail.cost.total)
    # more sites than stages: contiguous groups (the first one larger); fewer: an error
    grouped = plan_segmentation(
        spec=spec, model=model, resources=Resources(capacities={"a": 1, "b": 1, "c": 1, "d": 1})
    )
    assert grouped.sites == {"stage-0": ("a", "b"), "stage-1": ("c",), "stage-2": ("d",)}
    with pytest.raises(ConfigError, match="needs 3 sites"):
        plan_segmentation(spec=spec, model=model, resources=Resources(capacities={"a": 1, "b": 1}))
    with pytest.raises(ConfigError, match="3 stages need at least 3 sites, got 2"):
        plan_layer_mode(spec=spec, model=model, resources=Resources(capacities={"a": 1, "b": 1}))


@pytest.mark.parametrize(
    ("sites", "stages", "sizes"),
    [(7, 3, (3, 2, 2)), (6, 3, (2, 2, 2)), (3, 3, (1, 1, 1)), (5, 2, (3, 2)), (4, 1, (4,)), (10, 4, (3, 3, 2, 2))],
)
def test_group_sites_is_contiguous_and_as_even_as_possible(sites: int, stages: int, sizes: tuple[int, ...]) -> None:
    names = [f"s{i}" for i in range(sites)]
    groups = group_sites(sites=names, stages=stages)
    assert tuple(len(g) for g in groups) == sizes
    assert [s for g in groups for s in g] == names  # in the given order, every site once


def test_group_sites_needs_a_site_per_stage() -> None:
    with pytest.raises(ConfigError, match="3 stages need at least 3 sites, got 2"):
        group_sites(sites=["a", "b"], stages=3)
    with pytest.raises(ConfigError, match="at least one stage"):
        group_sites(sites=["a"], stages=0)


def test_grouped_stages_sum_their_sites_capacities() -> None:
    # 7 sites over 3 stages: groups (a, b, c), (d, e), (f, g) with capacities 1+2+3 = 6, 4+4 = 8, 1+1 = 2
    capacities = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 4.0, "f": 1.0, "g": 1.0}
    compute = [6.0, 6.0, 8.0, 8.0, 2.0, 2.0]
    model = ModelProfile.of(layers=[f"l{i}" for i in range(6)], layer_compute=compute, activation_bytes=[0.0] * 5)
    spec = parse_segmentation(data={"mode": "layer", "layer": {"stages": 3, "solver": "exact"}})
    plan = plan_segmentation(spec=spec, model=model, resources=Resources(capacities=capacities))
    assert plan.sites == {"stage-0": ("a", "b", "c"), "stage-1": ("d", "e"), "stage-2": ("f", "g")}
    assert isinstance(plan.detail, LayerPlan)
    # the balanced cut puts 12 / 6, 16 / 8 and 4 / 2 = 2 time units on every group
    assert plan.detail.cuts == (1, 3)
    assert plan.detail.cost.stage_times == (2.0, 2.0, 2.0)
    same = make_chain(compute=compute, activation_bytes=[0.0] * 5, capacities=[6.0, 8.0, 2.0])
    assert plan.detail.cost == cut_cost(chain=same, cuts=plan.detail.cuts)
    tabu = plan_segmentation(
        spec=spec.model_copy(update={"layer": spec.layer_spec.model_copy(update={"solver": "tabu"})}),
        model=model,
        resources=Resources(capacities=capacities),
    )
    assert isinstance(tabu.detail, LayerPlan)
    assert tabu.sites == plan.sites and tabu.detail.cost.total == pytest.approx(plan.detail.cost.total)


def test_tabu_equals_exact_on_random_grouped_federations() -> None:
    rng = np.random.default_rng(7)
    for _ in range(12):
        layers = int(rng.integers(3, 12))
        stages = int(rng.integers(2, min(layers, 4) + 1))
        sites = int(rng.integers(stages, 3 * stages + 1))
        capacities = {f"s{i}": float(rng.choice([1.0, 1.5, 4.0])) for i in range(sites)}
        model = ModelProfile.of(
            layers=[f"l{i}" for i in range(layers)],
            layer_compute=rng.lognormal(0.0, 1.0, layers).tolist(),
            activation_bytes=rng.lognormal(0.0, 1.0, layers - 1).tolist(),
        )
        plans = [
            plan_segmentation(
                spec=parse_segmentation(data={"mode": "layer", "layer": {"stages": stages, "solver": solver}}),
                model=model,
                resources=Resources(capacities=capacities, bandwidth=10.0),
            )
            for solver in ("exact", "tabu")
        ]
        exact, tabu = (p.detail for p in plans)
        assert isinstance(exact, LayerPlan) and isinstance(tabu, LayerPlan)
        assert tabu.cost.total == pytest.approx(exact.cost.total)
        assert plans[0].sites == plans[1].sites
        assert sum(len(g) for g in plans[0].sites.values()) == sites
