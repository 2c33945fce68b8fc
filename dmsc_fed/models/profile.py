"""Layer profile of a chain model: the costs layer segmentation cuts by.

Layer segmentation (draft-yang-dmsc-distributed-model-03, section 6.2.5) picks cut
points by compute load and communication. :func:`profile_layers` measures both on a
model: one forward pass of a single sample with forward hooks gives, per layer, the
multiply-accumulates it performs and the bytes of activations that cross a cut right
after it. :meth:`LayerProfile.to_model_profile` hands them to the planners
(:class:`dmsc_fed.segmentation.registry.ModelProfile`).

What a layer is
---------------
The model must be a chain, an ``nn.Sequential``. Its layers are the top-level
children that own parameters (``Linear``, ``Conv2d``, or a block holding them). A
child without parameters (``ReLU``, ``Dropout``, ``MaxPool2d``, ``Flatten``) joins the
layer before it, so a cut never falls between a layer and its activation or pooling;
parameterless children before the first layer (``Flatten``, ``Unflatten``) join the
first layer. A layer is named after its parameter-owning child (``"1"`` for
``model[1]``).

Costs
-----
Multiply-accumulates per sample of each ``Linear`` (``in * out`` per output
position) and ``Conv`` (``output elements * in_channels / groups * kernel size``)
inside a layer; another module with parameters counts one per parameter (a rough
stand-in). Activation bytes are the float32 elements (4 bytes each) that the layer's
last merged child puts out for one sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dmsc_fed.errors import ModelError
from dmsc_fed.segmentation.registry import ModelProfile

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a chain.

    Attributes
    ----------
    name
        Module name of its parameter-owning child (``"1"``).
    modules
        Names of every top-level child merged into it, in order (``("0", "1", "2")``).
    parameters
        Its ``state_dict`` keys, in model order.
    shapes
        The shape of each of those entries.
    macs
        Multiply-accumulates per sample.
    activation_bytes
        Bytes of float32 activations per sample that leave it (cross a cut right after it).

    """

    name: str
    modules: tuple[str, ...]
    parameters: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    macs: float
    activation_bytes: float


@dataclass(frozen=True)
class LayerProfile:
    """The layers of a chain model in order, with their costs."""

    layers: tuple[LayerInfo, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Layer names in chain order."""
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> LayerInfo:
        """The layer called ``name``; ModelError naming the layers if there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ModelError(f"the model has no layer {name!r} (its layers: {list(self.names)})")

    def parameters_of(self, *, layers: Sequence[str]) -> tuple[str, ...]:
        """The ``state_dict`` keys of ``layers``, in model order.

        Parameters
        ----------
        layers
            Layer names (e.g. the layers of one pipeline stage).

        Raises
        ------
        ModelError
            A name is not a layer of the model.

        """
        wanted = set(layers)
        for name in wanted:
            self.layer(name)
        return tuple(p for layer in self.layers if layer.name in wanted for p in layer.parameters)

    def to_model_profile(self) -> ModelProfile:
        """What the segmentation planners need: layers, their compute, activation bytes and parameters."""
        return ModelProfile.of(
            parameters={p: s for layer in self.layers for p, s in zip(layer.parameters, layer.shapes, strict=True)},
            layers=self.names,
            layer_compute=[layer.macs for layer in self.layers],
            activation_bytes=[layer.activation_bytes for layer in self.layers[:-1]],
        )


def _macs(module: nn.Module, output: torch.Tensor) -> float:
    """Multiply-accumulates of one leaf module for the batch that produced ``output``."""
    if isinstance(module, nn.Linear):
        return float(output.numel() * module.in_features)
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        return float(output.numel() * (module.in_channels // module.groups) * kernel)
    return float(sum(p.numel() for p in module.parameters(recurse=False)))


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def profile_layers(*, model: nn.Module, example: torch.Tensor) -> LayerProfile:
    """Measure the layers of a chain model on one sample.

    Parameters
    ----------
    model
        An ``nn.Sequential`` (the zoo's ``logreg``, ``mlp`` and ``cnn``).
    example
        An input batch in the model's input form; only its first sample is used.

    Returns
    -------
    LayerProfile
        One :class:`LayerInfo` per parameter-owning child, in chain order.

    Raises
    ------
    ModelError
        The model is not a chain (layer mode needs one; a multi-task model has
        branches), has no parameters, or ``example`` is empty or does not fit it.

    """
    if not isinstance(model, nn.Sequential):
        raise ModelError(
            f"layer segmentation needs a chain (an nn.Sequential) to cut; {type(model).__name__} is not one "
            "(a multi-task model branches into heads: use business segmentation)"
        )
    children = list(model.named_children())
    groups: list[list[str]] = []
    pending: list[str] = []  # parameterless children before the first layer
    for name, child in children:
        if _owns_parameters(child):
            groups.append([*pending, name])
            pending = []
        elif groups:
            groups[-1].append(name)
        else:
            pending.append(name)
    if not groups:
        raise ModelError("the model has no layer with parameters to profile")
    if example.ndim == 0 or example.shape[0] == 0:
        raise ModelError("profile_layers needs an example batch with at least one sample")

    modules = dict(children)
    macs: dict[str, float] = {name: 0.0 for name, _ in children}
    outputs: dict[str, int] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def count(top: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and any(True for _ in module.parameters(recurse=False)):
                macs[top] += _macs(module, output)

        return hook

    def size(top: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise ModelError(f"layer {top!r} does not put out one tensor; cannot profile it")
            outputs[top] = output.numel()

        return hook

    was_training = model.training
    try:
        for name, child in children:
            handles.append(child.register_forward_hook(size(name)))
            handles.extend(m.register_forward_hook(count(name)) for m in child.modules())
        model.eval()
        with torch.no_grad():
            model(example[:1])
    except (RuntimeError, ValueError) as err:
        raise ModelError(f"the example input does not fit the model: {err}") from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    state = model.state_dict()
    layers: list[LayerInfo] = []
    for group in groups:
        keys = tuple(k for k in state if any(k.startswith(f"{m}.") for m in group))
        owner = next(m for m in group if _owns_parameters(modules[m]))
        layers.append(
            LayerInfo(
                name=owner,
                modules=tuple(group),
                parameters=keys,
                shapes=tuple(tuple(int(d) for d in state[k].shape) for k in keys),
                macs=sum(macs[m] for m in group),
                activation_bytes=float(outputs[group[-1]] * FLOAT32_BYTES),
            )
        )
    return LayerProfile(layers=tuple(layers))
