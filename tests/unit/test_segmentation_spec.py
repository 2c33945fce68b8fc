from __future__ import annotations

import tomllib
from typing import Any

import pytest

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation import (
    ModelProfile,
    Resources,
    SegmentationSpec,
    SegmentPrivacy,
    get_planner,
    parse_segmentation,
    plan_segmentation,
)

LAYERS = ["conv1", "conv2", "pool", "fc1", "fc2", "out"]
SITES = ["a", "b", "c"]

BUSINESS = """
mode = "business"

[business]
backbone = ["encoder"]
heads = { readmission = ["heads.readmission"], mortality = ["heads.mortality"] }
holders = { readmission = ["a", "b"], mortality = ["c"] }

[privacy.default]
encryption = "ckks"

[privacy.segments.backbone]
dp = "on"
"""


def _business(**overrides: Any) -> dict[str, Any]:
    business: dict[str, Any] = {
        "backbone": ["encoder"],
        "heads": {"t1": ["heads.t1"], "t2": ["heads.t2"]},
        "holders": {"t1": ["a"], "t2": ["b", "c"]},
    }
    business.update(overrides)
    return {"mode": "business", "business": business}


def test_toml_fragment_parses_and_privacy_merges_per_segment() -> None:
    spec = parse_segmentation(data=tomllib.loads(BUSINESS))
    assert spec.mode == "business" and spec.business_spec.segment_names() == ("backbone", "readmission", "mortality")
    assert spec.privacy_for("backbone") == SegmentPrivacy(dp="on", encryption="ckks")
    assert spec.privacy_for("mortality") == SegmentPrivacy(dp=None, encryption="ckks")
    spec.check_against(layers=["encoder.0.weight", "heads.readmission.w", "heads.mortality.w"], sites=SITES)


def test_defaults_of_layer_mode() -> None:
    spec = parse_segmentation(data={"mode": "layer", "layer": {}})
    assert spec.layer_spec.stages == 2 and spec.layer_spec.solver == "tabu"
    assert spec.layer_spec.cut_positions(layers=LAYERS) == (0, 1, 2, 3, 4)
    with pytest.raises(ConfigError, match="not 'block'"):
        _ = spec.block_spec


def test_json_round_trip() -> None:
    spec = parse_segmentation(data=tomllib.loads(BUSINESS))
    assert SegmentationSpec.model_validate_json(spec.model_dump_json()) == spec
    layer = parse_segmentation(data={"mode": "layer", "layer": {"cut_ranges": [[0, "fc1"]], "tabu": {"seed": 4}}})
    assert SegmentationSpec.model_validate_json(layer.model_dump_json()) == layer


def test_spec_is_frozen() -> None:
    spec = parse_segmentation(data={"mode": "layer", "layer": {}})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen models
        spec.mode = "block"


def test_cut_ranges_by_index_and_name() -> None:
    spec = parse_segmentation(data={"mode": "layer", "layer": {"stages": 3, "cut_ranges": [[0, 1], ["fc1", "out"]]}})
    # the position after the last layer ("out") is not a cut
    assert spec.layer_spec.cut_positions(layers=LAYERS) == (0, 1, 3, 4)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"mode": "layer", "layer": {"cut_ranges": [[5, 2]]}}, "cut range [5, 2] is out of order"),
        ({"mode": "layer", "layer": {"stages": 1}}, "greater than or equal to 2"),
        ({"mode": "layer", "layer": {"weights": {"compute": 0, "communication": 0, "latency": 0}}}, "all zero"),
        ({"mode": "layer", "layer": {"tabu": {"tenure": -1}}}, "layer.tabu.tenure"),
        ({"mode": "layer", "layer": {"tabu": {"iterationz": 5}}}, "unknown key"),
        ({"mode": "layer"}, "mode = 'layer' needs a [segmentation.layer] section"),
        ({"mode": "layer", "layer": {}, "block": {"block_size": 3}}, "applies to mode = 'block', not 'layer'"),
        ({"mode": "blocks", "block": {"block_size": 3}}, "'layer', 'business' or 'block'"),
        ({"mode": "block", "block": {"replication": 2}}, "exactly one of block_size or block_count"),
        ({"mode": "block", "block": {"block_size": 4, "block_count": 2}}, "exactly one of block_size or block_count"),
        ({"mode": "block", "block": {"block_size": 4, "replication": 0}}, "block.replication"),
        (_business(holders={"t1": ["a"]}), "task head 't2' is held by no site"),
        (_business(holders={"t1": ["a"], "t2": []}), "task head 't2' is held by no site"),
        (_business(holders={"t1": ["a"], "t2": ["b"], "t3": ["c"]}), "holders names task 't3', which has no head"),
        (_business(holders={"t1": ["a", "a"], "t2": ["b"]}), "lists a site twice"),
        (_business(heads={"backbone": ["x"]}, holders={"backbone": ["a"]}), "cannot be a task name"),
        (_business(backbone=["heads"]), "overlap"),
        (_business(backbone=["encoder", "encoder"]), "listed twice"),
        (_business(backbone=[]), "at least 1 item"),
        (_business(backbone=["encoder."]), "business.backbone.0"),
        (
            {"mode": "layer", "layer": {"stages": 2}, "privacy": {"segments": {"stage-2": {"dp": "on"}}}},
            "privacy.segments.stage-2: not a stage",
        ),
        (
            {"mode": "block", "block": {"block_count": 3}, "privacy": {"segments": {"block-3": {"dp": "on"}}}},
            "there are 3 blocks",
        ),
        ({**_business(), "privacy": {"segments": {"t9": {"dp": "on"}}}}, "not a segment of business segmentation"),
        ({"mode": "layer", "layer": {}, "privacy": {"default": {"dp": "yes"}}}, "privacy.default.dp"),
    ],
)
def test_bad_specs_are_config_errors_naming_the_problem(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_segmentation(data=data)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"mode": "layer", "layer": {"cut_ranges": [["conv1", "fc9"]]}}, "'fc9' is not a layer of the model"),
        ({"mode": "layer", "layer": {"cut_ranges": [[0, 9]]}}, "layer index 9 is out of range: the model has 6 layers"),
        ({"mode": "layer", "layer": {"cut_ranges": [["fc2", "conv2"]]}}, "out of order: it starts at layer 4 and ends"),
        ({"mode": "layer", "layer": {"stages": 4}}, "layer.stages = 4 needs 4 sites, the federation has 3"),
        ({"mode": "layer", "layer": {"stages": 7}}, "layer.stages = 7 needs at least 7 layers, the model has 6"),
        ({"mode": "layer", "layer": {"stages": 3, "cut_ranges": [[5, 5], [1, 1]]}}, "allow 1 cut position(s)"),
        ({"mode": "block", "block": {"block_size": 10, "replication": 4}}, "block.replication = 4 is more than the 3"),
        ({"mode": "business", "business": {**_business()["business"], "backbone": ["enc"]}}, "'enc' matches no"),
        (_business(holders={"t1": ["a"], "t2": ["zed"]}), "site 'zed' is not a member"),
    ],
)
def test_check_against_names_what_the_model_or_federation_lacks(data: dict[str, Any], needle: str) -> None:
    spec = parse_segmentation(data=data)
    names = LAYERS if spec.mode != "business" else ["encoder.w", "heads.t1.w", "heads.t2.w"]
    with pytest.raises(ConfigError) as err:
        spec.check_against(layers=names, sites=SITES)
    assert needle in str(err.value)


def test_check_against_lists_every_problem() -> None:
    spec = parse_segmentation(data={"mode": "layer", "layer": {"stages": 3, "cut_ranges": [["x", "y"]]}})
    with pytest.raises(ConfigError) as err:
        spec.check_against(layers=LAYERS, sites=["a"])
    text = str(err.value)
    assert "needs 3 sites" in text and "'x' is not a layer" in text and "'y' is not a layer" in text


def test_check_against_block_count_and_block_names_need_the_parameter_count() -> None:
    spec = parse_segmentation(
        data={"mode": "block", "block": {"block_size": 4}, "privacy": {"segments": {"block-3": {"dp": "on"}}}}
    )
    spec.check_against(layers=[], sites=SITES)  # unknown size: cannot tell yet
    spec.check_against(layers=[], sites=SITES, num_parameters=13)  # 4 blocks
    with pytest.raises(ConfigError, match="there are 3 blocks"):
        spec.check_against(layers=[], sites=SITES, num_parameters=12)
    big = parse_segmentation(data={"mode": "block", "block": {"block_count": 20}})
    with pytest.raises(ConfigError, match="block_count = 20 is more than the model's 12 parameters"):
        big.check_against(layers=[], sites=SITES, num_parameters=12)


def test_unknown_mode_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown segmentation mode 'pipeline': use one of \['block', 'business', 'layer'\]"
    ):
        get_planner("pipeline")


def test_plan_segmentation_checks_the_spec_first() -> None:
    spec = SegmentationSpec.model_validate({"mode": "block", "block": {"block_count": 2, "replication": 3}})
    model = ModelProfile.of(parameters={"w": (2, 2)})
    with pytest.raises(ConfigError, match="replication = 3 is more than the 2 site"):
        plan_segmentation(spec=spec, model=model, resources=Resources(capacities={"a": 1.0, "b": 1.0}))


def test_plan_segmentation_attaches_sites_and_privacy_per_segment() -> None:
    spec = parse_segmentation(data=tomllib.loads(BUSINESS))
    model = ModelProfile.of(
        parameters={"encoder.0.weight": (4, 3), "heads.readmission.w": (2, 4), "heads.mortality.w": (1, 4)}
    )
    plan = plan_segmentation(spec=spec, model=model, resources=Resources(capacities={"a": 1, "b": 1, "c": 2}))
    assert plan.segments == ("backbone", "readmission", "mortality")
    assert plan.sites == {"backbone": ("a", "b", "c"), "readmission": ("a", "b"), "mortality": ("c",)}
    assert plan.privacy["backbone"].dp == "on" and plan.privacy["mortality"].dp is None
