"""The segmentation module's facade: one planner per mode, found by name.

Draft-yang-dmsc-distributed-model-03, section 6.2.5 offers three segmentation modes;
each has a planner here, registered under its mode name (as Opacus finds accountants
by name). :func:`plan_segmentation` checks a spec against the model and the sites,
runs the planner of its mode and returns a :class:`SegmentationPlan`: the segments,
the sites that train each one, its privacy, and the mode's own detailed plan. What
the scheduler (section 6.2.6) and the strategies (section 6.2.7) do with it is theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation.block import BlockPlan, plan_blocks
from dmsc_fed.segmentation.business import BusinessPlan, plan_business
from dmsc_fed.segmentation.costs import CostWeights, LayerPlan, make_chain
from dmsc_fed.segmentation.layer_exact import solve_exact
from dmsc_fed.segmentation.layer_tabu import solve_tabu
from dmsc_fed.segmentation.names import stage_segment
from dmsc_fed.segmentation.spec import SegmentationSpec, SegmentPrivacy


@dataclass(frozen=True)
class ModelProfile:
    """What the planners know of a model.

    Attributes
    ----------
    parameters
        ``(name, shape)`` of every parameter, in model order (business and block modes).
    layers
        Layer names in chain order (layer mode).
    layer_compute
        Compute cost of each layer (layer mode).
    activation_bytes
        Bytes crossing a cut right after each layer but the last (layer mode).

    """

    parameters: tuple[tuple[str, tuple[int, ...]], ...] = ()
    layers: tuple[str, ...] = ()
    layer_compute: tuple[float, ...] = ()
    activation_bytes: tuple[float, ...] = ()

    @classmethod
    def of(
        cls,
        *,
        parameters: Mapping[str, Sequence[int]] | None = None,
        layers: Sequence[str] = (),
        layer_compute: Sequence[float] = (),
        activation_bytes: Sequence[float] = (),
    ) -> ModelProfile:
        """Build a profile from plain sequences and mappings."""
        return cls(
            parameters=tuple((n, tuple(int(d) for d in s)) for n, s in (parameters or {}).items()),
            layers=tuple(layers),
            layer_compute=tuple(float(c) for c in layer_compute),
            activation_bytes=tuple(float(a) for a in activation_bytes),
        )

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Parameter names in model order."""
        return tuple(n for n, _ in self.parameters)

    @property
    def num_parameters(self) -> int:
        """Total number of parameter values."""
        total = 0
        for _, shape in self.parameters:
            size = 1
            for d in shape:
                size *= d
            total += size
        return total


@dataclass(frozen=True)
class Resources:
    """The sites that take part and what they can do.

    Attributes
    ----------
    capacities
        Site -> capacity, in member order; for layer mode, in pipeline order
        (contiguous groups of sites form the stages, see :func:`group_sites`).
    bandwidth
        Bytes per unit time between consecutive pipeline stages (layer mode).
    cut_latency
        Fixed time per cut (layer mode).

    """

    capacities: Mapping[str, float]
    bandwidth: float = 1.0
    cut_latency: float = 0.0


@dataclass(frozen=True)
class SegmentationPlan:
    """The outcome of planning: segments, who trains them, their privacy, the mode's detail.

    Attributes
    ----------
    mode
        ``layer``, ``business`` or ``block``.
    segments
        Segment names in order (``stage-k``, ``backbone`` and tasks, ``block-i``).
    sites
        Segment name -> the sites that train it.
    privacy
        Segment name -> its privacy (None fields: the task's ``[privacy]`` applies).
    detail
        The mode's own plan.

    """

    mode: str
    segments: tuple[str, ...]
    sites: Mapping[str, tuple[str, ...]]
    privacy: Mapping[str, SegmentPrivacy]
    detail: LayerPlan | BusinessPlan | BlockPlan = field(repr=False)


class Planner(Protocol):
    """A planner: ``planner(spec=..., model=..., resources=...) -> SegmentationPlan``."""

    def __call__(self, *, spec: SegmentationSpec, model: ModelProfile, resources: Resources) -> SegmentationPlan:
        """Plan the segmentation of ``model`` over ``resources`` as ``spec`` asks."""
        ...


PLANNERS: dict[str, Planner] = {}


def register(mode: str) -> Callable[[Planner], Planner]:
    """Register a planner under ``mode``."""

    def deco(fn: Planner) -> Planner:
        PLANNERS[mode] = fn
        return fn

    return deco


def get_planner(mode: str) -> Planner:
    """The planner of ``mode``; ConfigError listing the known modes if there is none."""
    try:
        return PLANNERS[mode]
    except KeyError:
        raise ConfigError(f"unknown segmentation mode {mode!r}: use one of {sorted(PLANNERS)}") from None


def _finish(
    *, spec: SegmentationSpec, sites: Mapping[str, tuple[str, ...]], detail: LayerPlan | BusinessPlan | BlockPlan
) -> SegmentationPlan:
    return SegmentationPlan(
        mode=spec.mode,
        segments=tuple(sites),
        sites=MappingProxyType(dict(sites)),
        privacy=MappingProxyType({name: spec.privacy_for(name) for name in sites}),
        detail=detail,
    )


def group_sites(*, sites: Sequence[str], stages: int) -> tuple[tuple[str, ...], ...]:
    """Split ``sites`` (in the given order) into ``stages`` contiguous groups, as even as possible.

    With ``n`` sites, the first ``n mod stages`` groups have one site more than
    the others: 7 sites over 3 stages give groups of 3, 2 and 2.

    Raises
    ------
    ConfigError
        Fewer sites than stages, or ``stages`` below 1.

    """
    if stages < 1:
        raise ConfigError(f"layer mode needs at least one stage, got {stages}")
    if len(sites) < stages:
        raise ConfigError(
            f"layer mode runs every stage on at least one site: {stages} stages need at least {stages} sites, "
            f"got {len(sites)}"
        )
    size, extra = divmod(len(sites), stages)
    groups: list[tuple[str, ...]] = []
    start = 0
    for k in range(stages):
        end = start + size + (1 if k < extra else 0)
        groups.append(tuple(sites[start:end]))
        start = end
    return tuple(groups)


@register("layer")
def plan_layer_mode(*, spec: SegmentationSpec, model: ModelProfile, resources: Resources) -> SegmentationPlan:
    """Cut the layer chain into ``stages`` stages over groups of sites.

    The sites of ``resources`` (in pipeline order) are split into ``stages``
    contiguous groups as evenly as possible (:func:`group_sites`); stage ``k``
    runs on group ``k``, whose capacity is the sum of its sites' capacities (the
    group trains the stage's layers together). With exactly ``stages`` sites,
    stage ``k`` runs on the ``k``-th site.
    """
    layer = spec.layer_spec
    groups = group_sites(sites=list(resources.capacities), stages=layer.stages)
    if len(model.layer_compute) != len(model.layers):
        raise ConfigError(f"the model profile has {len(model.layers)} layers but {len(model.layer_compute)} costs")
    chain = make_chain(
        compute=model.layer_compute,
        activation_bytes=model.activation_bytes,
        capacities=[sum(resources.capacities[s] for s in group) for group in groups],
        weights=CostWeights(
            compute=layer.weights.compute, communication=layer.weights.communication, latency=layer.weights.latency
        ),
        bandwidth=resources.bandwidth,
        cut_latency=resources.cut_latency,
        allowed_cuts=layer.cut_positions(layers=model.layers),
    )
    if layer.solver == "exact":
        plan = solve_exact(chain=chain)
    else:
        t = layer.tabu
        plan = solve_tabu(
            chain=chain,
            iterations=t.iterations,
            tenure=t.tenure,
            neighbourhood=t.neighbourhood,
            seed=t.seed,
            verify=t.verify,
        )
    return _finish(spec=spec, sites={stage_segment(k): group for k, group in enumerate(groups)}, detail=plan)


@register("business")
def plan_business_mode(*, spec: SegmentationSpec, model: ModelProfile, resources: Resources) -> SegmentationPlan:
    """Backbone across all sites, each task head among its holders."""
    business = spec.business_spec
    plan = plan_business(
        parameter_names=model.parameter_names,
        backbone=business.backbone,
        heads=business.heads,
        holders=business.holders,
        sites=list(resources.capacities),
    )
    return _finish(spec=spec, sites={seg.name: seg.sites for seg in plan.segments}, detail=plan)


@register("block")
def plan_block_mode(*, spec: SegmentationSpec, model: ModelProfile, resources: Resources) -> SegmentationPlan:
    """Blocks of the flat parameter vector, each on ``replication`` sites, shares by capacity."""
    block = spec.block_spec
    plan = plan_blocks(
        parameters=dict(model.parameters),
        capacities=resources.capacities,
        block_size=block.block_size,
        block_count=block.block_count,
        replication=block.replication,
    )
    return _finish(spec=spec, sites={b.name: b.sites for b in plan.blocks}, detail=plan)


def plan_segmentation(*, spec: SegmentationSpec, model: ModelProfile, resources: Resources) -> SegmentationPlan:
    """Check ``spec`` against the model and sites, then run the planner of its mode.

    Raises
    ------
    ConfigError
        The spec does not fit the model or the sites, or the planner cannot plan.

    """
    names = model.layers if spec.mode == "layer" else model.parameter_names
    spec.check_against(
        layers=names,
        sites=list(resources.capacities),
        num_parameters=model.num_parameters if model.parameters else None,
    )
    return get_planner(spec.mode)(spec=spec, model=model, resources=resources)
