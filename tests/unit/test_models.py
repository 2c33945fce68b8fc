from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from dmsc_fed.config import ModelSpec
from dmsc_fed.data.sources import BUNDLED_SHAPES, load_bundled
from dmsc_fed.errors import ModelError
from dmsc_fed.models import MODELS, build_model

CASES = [
    ("logreg", "breast_cancer"),
    ("mlp", "breast_cancer"),
    ("logreg", "digits"),
    ("mlp", "digits"),
    ("cnn", "digits"),
]


@pytest.mark.parametrize(("model", "dataset"), CASES)
def test_models_build_run_and_are_opacus_compatible(model: str, dataset: str) -> None:
    shape = BUNDLED_SHAPES[dataset]
    net = build_model(
        spec=ModelSpec(name=model),
        num_features=shape.num_features,
        num_classes=shape.num_classes,
        image_shape=shape.image_shape,
    )
    out = net(torch.randn(5, shape.num_features))
    assert out.shape == (5, shape.num_classes)
    assert ModuleValidator.validate(net, strict=False) == []


def test_seeded_initialisation_is_reproducible() -> None:
    spec = ModelSpec(name="mlp", hidden=[8])
    a = build_model(spec=spec, num_features=4, num_classes=2, seed=1)
    b = build_model(spec=spec, num_features=4, num_classes=2, seed=1)
    c = build_model(spec=spec, num_features=4, num_classes=2, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_registry_and_errors() -> None:
    assert set(MODELS) == {"logreg", "mlp", "cnn", "multitask"}
    with pytest.raises(ModelError, match="needs image data"):
        build_model(spec=ModelSpec(name="cnn"), num_features=30, num_classes=2)


@pytest.mark.parametrize("name", sorted(BUNDLED_SHAPES))
def test_bundled_shapes_match_the_data(name: str) -> None:
    raw = load_bundled(name=name)
    shape = BUNDLED_SHAPES[name]
    assert raw.x.shape[1] == shape.num_features and raw.num_classes == shape.num_classes
    assert raw.image_shape == shape.image_shape
