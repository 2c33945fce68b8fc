from __future__ import annotations

from typing import Any

import pytest

from dmsc_fed.errors import ConfigError
from dmsc_fed.segmentation import BusinessPlan, aggregate_blocks, plan_business

PARAMS = [
    "encoder.0.weight",
    "encoder.0.bias",
    "encoder.2.weight",
    "heads.click.weight",
    "heads.click.bias",
    "heads.persona.weight",
]
HEADS = {"click": ["heads.click"], "persona": ["heads.persona"]}
HOLDERS = {"click": ["shop-b", "shop-a"], "persona": ["shop-c"]}
SITES = ["shop-a", "shop-b", "shop-c"]


def _plan(**overrides: Any) -> BusinessPlan:
    args: dict[str, Any] = {
        "parameter_names": PARAMS,
        "backbone": ["encoder"],
        "heads": HEADS,
        "holders": HOLDERS,
        "sites": SITES,
    }
    args.update(overrides)
    return plan_business(**args)


def test_backbone_on_all_sites_heads_on_their_holders() -> None:
    plan = _plan()
    assert [s.name for s in plan.segments] == ["backbone", "click", "persona"]
    backbone, click, persona = plan.segments
    assert backbone.parameters == ("encoder.0.weight", "encoder.0.bias", "encoder.2.weight")
    assert backbone.sites == ("shop-a", "shop-b", "shop-c")
    assert click.parameters == ("heads.click.weight", "heads.click.bias")
    assert click.sites == ("shop-a", "shop-b")  # member order, not the order holders were listed in
    assert persona.parameters == ("heads.persona.weight",) and persona.sites == ("shop-c",)
    assert plan.segment_of(parameter="heads.click.bias").name == "click"
    assert plan.parameters_of(site="shop-c") == (*backbone.parameters, "heads.persona.weight")
    assert plan.segment("persona") is persona


def test_every_parameter_in_exactly_one_segment() -> None:
    plan = _plan()
    flat = [p for s in plan.segments for p in s.parameters]
    assert sorted(flat) == sorted(PARAMS)


def test_prefixes_match_on_dotted_boundaries() -> None:
    plan = _plan(
        parameter_names=["0.weight", "1.weight", "10.weight"],
        backbone=["0", "10"],
        heads={"t": ["1"]},
        holders={"t": ["shop-a"]},
    )
    assert plan.segments[0].parameters == ("0.weight", "10.weight")
    assert plan.segments[1].parameters == ("1.weight",)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"holders": {"click": ["shop-a"]}}, "task head 'persona' is held by no site"),
        ({"holders": {**HOLDERS, "persona": []}}, "task head 'persona' is held by no site"),
        ({"holders": {**HOLDERS, "ads": ["shop-a"]}}, "holders names task 'ads', which has no head"),
        ({"holders": {**HOLDERS, "persona": ["shop-z"]}}, "held by ['shop-z'], not members"),
        ({"parameter_names": [*PARAMS, "heads.ads.weight"]}, "parameter 'heads.ads.weight' belongs to no segment"),
        ({"parameter_names": [*PARAMS, "decoder.bias"]}, "parameter 'decoder.bias' belongs to no segment"),
        ({"backbone": ["encoder", "heads.click.bias"]}, "parameter 'heads.click.bias' belongs to 2 segments"),
        ({"backbone": ["encoder", "decoder"]}, "prefix 'decoder' of segment 'backbone' matches no parameter"),
        ({"heads": {}, "holders": {}}, "at least one task head"),
        ({"backbone": []}, "at least one backbone prefix"),
        ({"sites": []}, "at least one site"),
        ({"sites": ["shop-a", "shop-a"]}, "listed twice"),
        ({"parameter_names": [*PARAMS, "encoder.0.bias"]}, "parameter 'encoder.0.bias' is listed twice"),
    ],
)
def test_bad_business_plans_name_the_problem(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _plan(**overrides)
    assert needle in str(err.value)


def test_heads_aggregate_among_their_holders_only() -> None:
    import numpy as np

    plan = _plan()
    updates = {
        site: {seg.name: np.full(2, float(i + 1), dtype=np.float32) for seg in plan.segments if site in seg.sites}
        for i, site in enumerate(SITES)
    }
    out = aggregate_blocks(updates=updates, weights={"shop-a": 1, "shop-b": 3, "shop-c": 4})
    # backbone: (1*1 + 3*2 + 4*3) / 8 = 19/8; click: (1*1 + 3*2) / 4 = 7/4; persona: only shop-c
    assert out["backbone"].tolist() == [19 / 8] * 2
    assert out["click"].tolist() == [7 / 4] * 2
    assert out["persona"].tolist() == [3.0] * 2
