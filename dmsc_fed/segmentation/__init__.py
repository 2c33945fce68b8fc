"""Model segmentation planners (draft-yang-dmsc-distributed-model-03, sections 6.2.4-6.2.6).

Pure and framework-free: numpy and pydantic only, no torch, no Flower.

- :mod:`.spec`: the segmentation interface (6.2.4), a validated spec of the mode, its
  limits and privacy per segment.
- :mod:`.costs`, :mod:`.layer_exact`, :mod:`.layer_tabu`: layer segmentation (6.2.5),
  cut points of a layer chain over heterogeneous sites, exact and by tabu search.
- :mod:`.business`: business segmentation (6.2.5), shared backbone and task heads.
- :mod:`.block`: block segmentation (6.2.5), blocks of the flat parameter vector on
  sites by capacity with replication, and per-block aggregation.
- :mod:`.registry`: one planner per mode, found by name; :func:`plan_segmentation`.
"""

from __future__ import annotations

from dmsc_fed.segmentation.block import (
    Block,
    BlockPlan,
    ParamSlice,
    aggregate_blocks,
    assign_blocks,
    block_bounds,
    plan_blocks,
)
from dmsc_fed.segmentation.business import BusinessPlan, Segment, plan_business
from dmsc_fed.segmentation.costs import (
    Chain,
    CostWeights,
    CutCost,
    LayerPlan,
    check_cuts,
    cut_cost,
    make_chain,
    stage_times,
)
from dmsc_fed.segmentation.layer_exact import min_bottleneck, solve_exact
from dmsc_fed.segmentation.layer_tabu import proportional_start, solve_tabu
from dmsc_fed.segmentation.names import BACKBONE, block_segment, matches_prefix, stage_segment
from dmsc_fed.segmentation.registry import (
    PLANNERS,
    ModelProfile,
    Planner,
    Resources,
    SegmentationPlan,
    get_planner,
    plan_segmentation,
    register,
)
from dmsc_fed.segmentation.spec import (
    MODES,
    BlockSpec,
    BusinessSpec,
    CostWeightsSpec,
    LayerSpec,
    SegmentationSpec,
    SegmentPrivacy,
    SegmentPrivacySpec,
    TabuSpec,
    parse_segmentation,
)

__all__ = [
    "BACKBONE",
    "MODES",
    "PLANNERS",
    "Block",
    "BlockPlan",
    "BlockSpec",
    "BusinessPlan",
    "BusinessSpec",
    "Chain",
    "CostWeights",
    "CostWeightsSpec",
    "CutCost",
    "LayerPlan",
    "LayerSpec",
    "ModelProfile",
    "ParamSlice",
    "Planner",
    "Resources",
    "Segment",
    "SegmentPrivacy",
    "SegmentPrivacySpec",
    "SegmentationPlan",
    "SegmentationSpec",
    "TabuSpec",
    "aggregate_blocks",
    "assign_blocks",
    "block_bounds",
    "block_segment",
    "check_cuts",
    "cut_cost",
    "get_planner",
    "make_chain",
    "matches_prefix",
    "min_bottleneck",
    "parse_segmentation",
    "plan_blocks",
    "plan_business",
    "plan_segmentation",
    "proportional_start",
    "register",
    "solve_exact",
    "solve_tabu",
    "stage_segment",
    "stage_times",
]
