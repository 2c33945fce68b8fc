"""Plan a task's segmentation: the spec, the task's model and its sites in, the run-time layout out.

The facade the server (over the sites that joined) and ``dmsc-fed config validate``
(over every configured site) share, so a spec that cannot be planned fails before
any process starts. Sites' capacities come from their resource pools (draft section
6.3.8): a GPU site counts :data:`POOL_CAPACITY` ``["gpu"]`` times a CPU site.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dmsc_fed.config import FederationConfig
from dmsc_fed.segmentation.layout import SegmentLayout, layout_from_plan
from dmsc_fed.segmentation.registry import ModelProfile, Resources, plan_segmentation

if TYPE_CHECKING:
    from dmsc_fed.models.profile import LayerProfile

#: Relative training capacity of a site by resource pool: a GPU site takes four times the
#: blocks of a CPU site, and a layer stage's site group counts its sites' capacities.
POOL_CAPACITY = {"cpu": 1.0, "gpu": 4.0}


def plan_task(
    cfg: FederationConfig, *, shapes: Sequence[tuple[str, Sequence[int]]], members: Sequence[str], fallback: str
) -> SegmentLayout:
    """The layout of ``cfg``'s segmentation over ``members`` (in config order).

    Parameters
    ----------
    cfg
        A task with a ``[segmentation]`` section.
    shapes
        ``(name, shape)`` of the model's tensors in state-dict order.
    members
        The sites to plan over.
    fallback
        The rule of segments the spec gives none (the task strategy's rule).

    Raises
    ------
    ConfigError
        The spec does not fit the model or the sites.

    """
    seg = cfg.segmentation
    assert seg is not None
    pools = {s.name: s.pool for s in cfg.sites}
    layer_parameters: dict[str, tuple[str, ...]] | None = None
    layers: tuple[str, ...] = ()
    if seg.mode == "layer":
        profile = layer_profile(cfg)
        model = profile.to_model_profile()
        layers = model.layers
        layer_parameters = {layer: profile.parameters_of(layers=[layer]) for layer in layers}
    else:
        model = ModelProfile.of(parameters=dict(shapes))
    plan = plan_segmentation(
        spec=seg, model=model, resources=Resources(capacities={n: POOL_CAPACITY[pools[n]] for n in members})
    )
    return layout_from_plan(
        plan=plan,
        shapes=shapes,
        task_dp=cfg.privacy.dp == "on",
        task_encrypted=cfg.privacy.encryption != "off",
        rules={name: seg.rule_for(name, fallback=fallback) for name in plan.segments},
        layer_parameters=layer_parameters,
        layers=layers,
    )


def layer_profile(cfg: FederationConfig) -> LayerProfile:
    """The task model's layer chain, compute per layer and activations crossing each cut."""
    import torch

    from dmsc_fed.models.profile import profile_layers
    from dmsc_fed.training import data_shape, model_for

    shape = data_shape(cfg)
    return profile_layers(model=model_for(cfg, seed=cfg.seed), example=torch.zeros(1, shape.num_features))
