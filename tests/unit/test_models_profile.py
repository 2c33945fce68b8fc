from __future__ import annotations

import pytest
import torch
from torch import nn

from dmsc_fed.config import ModelSpec
from dmsc_fed.errors import ModelError
from dmsc_fed.models import LayerProfile, build_model, profile_layers
from dmsc_fed.segmentation import LayerPlan, Resources, parse_segmentation, plan_segmentation


def _expect(profile: LayerProfile, rows: list[tuple[str, tuple[str, ...], float, float]]) -> None:
    """Compare (name, modules, macs, activation bytes) of every layer."""
    got = [(layer.name, layer.modules, layer.macs, layer.activation_bytes) for layer in profile.layers]
    assert got == rows


def test_logreg_is_one_layer() -> None:
    net = build_model(spec=ModelSpec(name="logreg"), num_features=30, num_classes=2)
    profile = profile_layers(model=net, example=torch.randn(4, 30))
    # Flatten (0) joins the Linear (1): 30 * 2 MACs, 2 float32 logits out
    _expect(profile, [("1", ("0", "1"), 60.0, 8.0)])
    assert profile.layers[0].parameters == ("1.weight", "1.bias")
    assert profile.layers[0].shapes == ((2, 30), (2,))
    mp = profile.to_model_profile()
    assert mp.layers == ("1",) and mp.layer_compute == (60.0,) and mp.activation_bytes == ()
    assert mp.num_parameters == 62


def test_mlp_merges_activation_and_dropout_into_the_layer_before() -> None:
    net = build_model(spec=ModelSpec(name="mlp", hidden=[32, 16], dropout=0.1), num_features=30, num_classes=2)
    # 0 Flatten, 1 Linear(30, 32), 2 ReLU, 3 Dropout, 4 Linear(32, 16), 5 ReLU, 6 Dropout, 7 Linear(16, 2)
    profile = profile_layers(model=net, example=torch.randn(1, 30))
    _expect(
        profile,
        [
            ("1", ("0", "1", "2", "3"), 30.0 * 32, 32.0 * 4),
            ("4", ("4", "5", "6"), 32.0 * 16, 16.0 * 4),
            ("7", ("7",), 16.0 * 2, 2.0 * 4),
        ],
    )
    assert profile.names == ("1", "4", "7")
    assert profile.parameters_of(layers=["4", "7"]) == ("4.weight", "4.bias", "7.weight", "7.bias")
    assert profile.parameters_of(layers=["7", "1"]) == ("1.weight", "1.bias", "7.weight", "7.bias")  # model order
    mp = profile.to_model_profile()
    assert mp.layer_compute == (960.0, 512.0, 32.0) and mp.activation_bytes == (128.0, 64.0)
    assert mp.parameter_names == tuple(net.state_dict())
    assert mp.num_parameters == sum(p.numel() for p in net.parameters())
    assert net.training  # profiling runs in eval mode and restores the mode
    with pytest.raises(ModelError, match=r"no layer '2' \(its layers: \['1', '4', '7'\]\)"):
        profile.parameters_of(layers=["2"])


def test_cnn_on_8x8_images() -> None:
    net = build_model(spec=ModelSpec(name="cnn"), num_features=64, num_classes=10, image_shape=(1, 8, 8))
    # 0 Unflatten, 1 Conv(1->16, 3x3, pad 1), 2 ReLU, 3 MaxPool, 4 Conv(16->32), 5 ReLU, 6 MaxPool, 7 Flatten,
    # 8 Linear(32*2*2 -> 32), 9 ReLU, 10 Linear(32 -> 10)
    profile = profile_layers(model=net, example=torch.rand(3, 64))
    _expect(
        profile,
        [
            ("1", ("0", "1", "2", "3"), 16 * 8 * 8 * 1 * 3 * 3, 16 * 4 * 4 * 4.0),  # 9216 MACs; pooled 16x4x4 out
            ("4", ("4", "5", "6", "7"), 32 * 4 * 4 * 16 * 3 * 3, 32 * 2 * 2 * 4.0),  # 73728 MACs; 128 values
            ("8", ("8", "9"), 128 * 32, 32 * 4.0),
            ("10", ("10",), 32 * 10, 10 * 4.0),
        ],
    )
    assert profile.layer("4").parameters == ("4.weight", "4.bias")
    assert profile.layer("4").shapes == ((32, 16, 3, 3), (32,))


def test_grouped_and_strided_convolution() -> None:
    net = nn.Sequential(nn.Conv2d(4, 8, kernel_size=3, stride=2, groups=2, bias=False), nn.Flatten(), nn.Linear(72, 3))
    profile = profile_layers(model=net, example=torch.randn(1, 4, 7, 7))
    # output 8 x 3 x 3 = 72 elements, each 4 / 2 input channels * 3 * 3 taps
    _expect(profile, [("0", ("0", "1"), 72 * 2 * 9, 72 * 4.0), ("2", ("2",), 72 * 3, 12.0)])
    assert profile.layer("0").parameters == ("0.weight",)


def test_nested_block_counts_every_linear_inside() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6)), nn.ReLU(), nn.Linear(6, 2))
    profile = profile_layers(model=net, example=torch.randn(1, 4))
    _expect(profile, [("0", ("0", "1"), 4 * 5 + 5 * 6, 24.0), ("2", ("2",), 12, 8.0)])
    assert profile.layer("0").parameters == ("0.0.weight", "0.0.bias", "0.2.weight", "0.2.bias")


def test_profile_refuses_what_it_cannot_cut() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.a(x)
            return out

    with pytest.raises(ModelError, match="needs a chain"):
        profile_layers(model=Branchy(), example=torch.randn(1, 2))
    with pytest.raises(ModelError, match="no layer with parameters"):
        profile_layers(model=nn.Sequential(nn.ReLU()), example=torch.randn(1, 2))
    with pytest.raises(ModelError, match="does not fit the model"):
        profile_layers(model=nn.Sequential(nn.Linear(3, 2)), example=torch.randn(1, 5))
    with pytest.raises(ModelError, match="at least one sample"):
        profile_layers(model=nn.Sequential(nn.Linear(3, 2)), example=torch.randn(0, 3))


def test_profile_feeds_the_layer_planner() -> None:
    net = build_model(spec=ModelSpec(name="cnn"), num_features=64, num_classes=10, image_shape=(1, 8, 8))
    profile = profile_layers(model=net, example=torch.rand(1, 64))
    spec = parse_segmentation(data={"mode": "layer", "layer": {"stages": 2, "solver": "exact"}})
    plan = plan_segmentation(
        spec=spec,
        model=profile.to_model_profile(),
        resources=Resources(capacities={"a": 1.0, "b": 1.0, "c": 1.0}, bandwidth=1e6),
    )
    assert plan.sites == {"stage-0": ("a", "b"), "stage-1": ("c",)}
    assert isinstance(plan.detail, LayerPlan)
    (first, last), *_ = plan.detail.stage_ranges(num_layers=len(profile.layers))
    stage0 = profile.parameters_of(layers=profile.names[first : last + 1])
    assert stage0 and all(name in net.state_dict() for name in stage0)
