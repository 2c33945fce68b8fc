"""Small models for tabular and 8x8 image data, found by name in a registry.

Every model avoids BatchNorm and other layers that mix samples, so Opacus can
compute per-sample gradients (checked by ``opacus.validators.ModuleValidator``
in the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dmsc_fed.config import ModelSpec
from dmsc_fed.errors import ModelError

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Register a model builder under ``name``."""

    def deco(fn: Builder) -> Builder:
        MODELS[name] = fn
        return fn

    return deco


@register("logreg")
def logistic_regression(
    *, num_features: int, num_classes: int, spec: ModelSpec, image_shape: tuple[int, int, int] | None
) -> nn.Module:
    """Multinomial logistic regression: one linear layer on flattened features."""
    return nn.Sequential(nn.Flatten(), nn.Linear(num_features, num_classes))


@register("mlp")
def mlp(*, num_features: int, num_classes: int, spec: ModelSpec, image_shape: tuple[int, int, int] | None) -> nn.Module:
    """Fully connected network with ReLU and optional dropout (``spec.hidden`` widths)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = num_features
    for h in spec.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register("cnn")
def small_cnn(
    *, num_features: int, num_classes: int, spec: ModelSpec, image_shape: tuple[int, int, int] | None
) -> nn.Module:
    """Two 3x3 convolution + ReLU + max-pool blocks and a dense head, for 8x8 single-channel images."""
    if image_shape is None:
        raise ModelError("model 'cnn' needs image data (e.g. dataset 'digits')")
    channels, height, width = image_shape
    return nn.Sequential(
        nn.Unflatten(1, image_shape),
        nn.Conv2d(channels, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 4) * (width // 4), spec.hidden[0] if spec.hidden else 64),
        nn.ReLU(),
        nn.Linear(spec.hidden[0] if spec.hidden else 64, num_classes),
    )


def build_model(
    *,
    spec: ModelSpec,
    num_features: int,
    num_classes: int,
    image_shape: tuple[int, int, int] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build the model ``spec.name``; with ``seed`` the initial weights are reproducible."""
    try:
        builder = MODELS[spec.name]
    except KeyError:
        raise ModelError(f"unknown model {spec.name!r}; known models: {sorted(MODELS)}") from None
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return builder(num_features=num_features, num_classes=num_classes, spec=spec, image_shape=image_shape)
    return builder(num_features=num_features, num_classes=num_classes, spec=spec, image_shape=image_shape)
