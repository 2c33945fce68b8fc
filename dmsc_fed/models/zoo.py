"""Small models for tabular and 8x8 image data, found by name in a registry.

Every model avoids BatchNorm and other layers that mix samples, so Opacus can
compute per-sample gradients (checked by ``opacus.validators.ModuleValidator``
in the tests).

``multitask`` is :class:`MultiTaskNet`, the model of business segmentation
(draft-yang-dmsc-distributed-model-03, section 6.2.5): a shared backbone
(parameters ``backbone.*``) and one head per task (``heads.<task>.*``), hard
parameter sharing as in Caruana 1997, "Multitask Learning". A site trains the
backbone and the head of its task through :func:`task_view`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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
    *,
    num_features: int,
    num_classes: int,
    spec: ModelSpec,
    image_shape: tuple[int, int, int] | None,
    tasks: Mapping[str, int] | None = None,
) -> nn.Module:
    """Multinomial logistic regression: one linear layer on flattened features."""
    return nn.Sequential(nn.Flatten(), nn.Linear(num_features, num_classes))


@register("mlp")
def mlp(
    *,
    num_features: int,
    num_classes: int,
    spec: ModelSpec,
    image_shape: tuple[int, int, int] | None,
    tasks: Mapping[str, int] | None = None,
) -> nn.Module:
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
    *,
    num_features: int,
    num_classes: int,
    spec: ModelSpec,
    image_shape: tuple[int, int, int] | None,
    tasks: Mapping[str, int] | None = None,
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


class MultiTaskNet(nn.Module):
    """A shared MLP backbone and one linear head per task.

    Parameters are named ``backbone.*`` (the MLP: ``Linear``, ``ReLU``, optional
    ``Dropout`` per hidden width) and ``heads.<task>.*`` (one ``Linear`` per
    task), so business segmentation can take ``backbone = ["backbone"]`` and
    ``heads = {<task> = ["heads.<task>"]}``.

    Parameters
    ----------
    num_features
        Input features per sample.
    hidden
        Widths of the backbone's hidden layers (at least one).
    tasks
        Task name -> number of classes; the first task is the default of :meth:`forward`.
    dropout
        Dropout after every hidden layer (0: none).

    """

    def __init__(self, *, num_features: int, hidden: Sequence[int], tasks: Mapping[str, int], dropout: float = 0.0):
        super().__init__()
        if not hidden:
            raise ModelError("model 'multitask' needs at least one hidden layer (model.hidden) as its backbone")
        if not tasks:
            raise ModelError("model 'multitask' needs at least one task")
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.backbone = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({task: nn.Linear(width, classes) for task, classes in tasks.items()})

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names, first (default) task first."""
        return tuple(self.heads.keys())

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Logits of ``task`` (None: the first task), so generic single-task code keeps working."""
        name = self.tasks[0] if task is None else task
        if name not in self.heads:
            raise ModelError(f"model 'multitask' has no head {name!r} (its tasks: {list(self.tasks)})")
        out: torch.Tensor = self.heads[name](self.backbone(x))
        return out


class TaskView(nn.Module):
    """One task of a :class:`MultiTaskNet`: ``heads[task](backbone(x))``, sharing its modules.

    Its parameters are the net's own backbone and head objects, named as in the
    net (``backbone.*``, ``heads.<task>.*``), so its ``state_dict`` is the part of
    the net's that a site holding ``task`` trains, and an optimizer over its
    parameters updates the net. Build it with :func:`task_view`.
    """

    def __init__(self, *, net: MultiTaskNet, task: str):
        super().__init__()
        if task not in net.heads:
            raise ModelError(f"model 'multitask' has no head {task!r} (its tasks: {list(net.tasks)})")
        self.task = task
        self.backbone = net.backbone
        self.heads = nn.ModuleDict({task: net.heads[task]})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the view's task."""
        out: torch.Tensor = self.heads[self.task](self.backbone(x))
        return out


def task_view(*, model: nn.Module, task: str) -> TaskView:
    """The single-task view of a :class:`MultiTaskNet` for ``task``, sharing its parameters.

    Parameters
    ----------
    model
        A :class:`MultiTaskNet`.
    task
        One of its tasks.

    Returns
    -------
    TaskView
        A module whose forward is ``model.heads[task](model.backbone(x))``;
        training it (with or without Opacus) trains the backbone and that head.

    Raises
    ------
    ModelError
        ``model`` is not a :class:`MultiTaskNet` or has no head ``task``.

    """
    if not isinstance(model, MultiTaskNet):
        raise ModelError(f"a task view needs the 'multitask' model, not {type(model).__name__}")
    return TaskView(net=model, task=task)


@register("multitask")
def multitask(
    *,
    num_features: int,
    num_classes: int,
    spec: ModelSpec,
    image_shape: tuple[int, int, int] | None,
    tasks: Mapping[str, int] | None = None,
) -> nn.Module:
    """:class:`MultiTaskNet` with ``spec.hidden`` backbone widths and one head per task of the data."""
    if not tasks:
        raise ModelError("model 'multitask' needs a dataset with tasks (e.g. 'clinical')")
    return MultiTaskNet(num_features=num_features, hidden=spec.hidden, tasks=tasks, dropout=spec.dropout)


def build_model(
    *,
    spec: ModelSpec,
    num_features: int,
    num_classes: int,
    image_shape: tuple[int, int, int] | None = None,
    tasks: Mapping[str, int] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build the model ``spec.name``; with ``seed`` the initial weights are reproducible.

    ``tasks`` (task name -> classes, for multi-task data) is passed on to the
    builder only when given, so builders registered without it keep working on
    single-task data.
    """
    try:
        builder = MODELS[spec.name]
    except KeyError:
        raise ModelError(f"unknown model {spec.name!r}; known models: {sorted(MODELS)}") from None
    kwargs: dict[str, object] = {
        "num_features": num_features,
        "num_classes": num_classes,
        "spec": spec,
        "image_shape": image_shape,
    }
    if tasks is not None:
        kwargs["tasks"] = dict(tasks)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return builder(**kwargs)
    return builder(**kwargs)
