"""Local training and evaluation loops shared by the ClientApp and the baseline.

These are plain PyTorch loops over in-memory arrays; they run on CUDA when it is
available and on the CPU otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dmsc_fed.config import FederationConfig
from dmsc_fed.data.sources import BUNDLED_SHAPES, DataShape
from dmsc_fed.errors import ModelError
from dmsc_fed.models import build_model


def pick_device(preferred: str | None = None) -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if preferred:
        if preferred.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device {preferred!r} was asked for but CUDA is not available")
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def data_shape(cfg: FederationConfig) -> DataShape:
    """Input and output sizes of the configured dataset, known without loading it."""
    ds = cfg.dataset
    if ds.name == "csv":
        assert ds.feature_columns is not None and ds.num_classes is not None
        return DataShape(num_features=len(ds.feature_columns), num_classes=ds.num_classes)
    return BUNDLED_SHAPES[ds.name]


def model_for(cfg: FederationConfig, *, seed: int | None = None) -> nn.Module:
    """The configured model for the configured dataset (a multi-task model gets a head per dataset task)."""
    shape = data_shape(cfg)
    return build_model(
        spec=cfg.model,
        num_features=shape.num_features,
        num_classes=shape.num_classes,
        image_shape=shape.image_shape,
        tasks=shape.task_classes or None,
        seed=seed,
    )


@dataclass(frozen=True)
class FitResult:
    """What one local training call reports."""

    loss: float
    accuracy: float
    num_examples: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy on a labelled split."""

    loss: float
    accuracy: float
    num_examples: int


def make_optimizer(cfg: FederationConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The configured optimizer over ``params``."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum)


def make_loader(*, x: NDArray[np.float32], y: NDArray[np.int64], batch_size: int, seed: int) -> DataLoader[Any]:
    """Shuffled minibatches over in-memory arrays."""
    return DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=min(batch_size, len(y)),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


def run_epochs(
    *,
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    on_empty_batch: Callable[[], None] | None = None,
) -> tuple[float, float, int]:
    """Train for ``epochs``; returns mean loss, accuracy and steps of the last epoch's batches, and all steps."""
    model.to(device).train()
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(epochs):
        total_loss, correct, seen = 0.0, 0, 0
        for xb, yb in loader:
            steps += 1
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            if len(yb) == 0:  # Poisson sampling can draw an empty batch; the (noisy) step still counts
                if on_empty_batch is None:
                    raise RuntimeError("empty batch without an on_empty_batch handler")
                on_empty_batch()
                continue
            out = model(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(yb)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(yb)
    return total_loss / max(seen, 1), correct / max(seen, 1), steps


def train(
    *,
    model: nn.Module,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    cfg: FederationConfig,
    device: torch.device,
    seed: int,
) -> FitResult:
    """Train ``model`` for ``cfg.local_epochs`` epochs of minibatch SGD/Adam (no DP).

    Returns the mean loss and accuracy over the last epoch's batches.
    """
    start = time.perf_counter()
    loader = make_loader(x=x, y=y, batch_size=cfg.batch_size, seed=seed)
    opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    loss, acc, _ = run_epochs(model=model, loader=loader, optimizer=opt, epochs=cfg.local_epochs, device=device)
    return FitResult(loss=loss, accuracy=acc, num_examples=len(y), seconds=time.perf_counter() - start)


@torch.no_grad()
def evaluate(*, model: nn.Module, x: NDArray[np.float32], y: NDArray[np.int64], device: torch.device) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    model.to(device).eval()
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    out = model(xt)
    loss = float(nn.functional.cross_entropy(out, yt))
    acc = float((out.argmax(1) == yt).float().mean())
    return EvalResult(loss=loss, accuracy=acc, num_examples=len(y))


@torch.no_grad()
def predict_scores(*, model: nn.Module, x: NDArray[np.float32], device: torch.device) -> NDArray[np.float64]:
    """Predicted probability of the positive class (class 1) of a two-class model.

    The softmax of the model's two outputs, column 1, computed in float64 so that
    a score above 0.5 is exactly the argmax that :func:`evaluate` scores. Feed it
    to :func:`dmsc_fed.metrics.binary_counts`.

    Parameters
    ----------
    model
        A classifier with two outputs per sample.
    x
        Features, one row per sample.
    device
        Where to run the model.

    Returns
    -------
    NDArray[np.float64]
        One score in ``[0, 1]`` per row of ``x``.

    Raises
    ------
    ModelError
        The model does not give two outputs per sample.

    """
    model.to(device).eval()
    out = model(torch.from_numpy(x).to(device))
    if out.ndim != 2 or out.shape[1] != 2:
        raise ModelError(f"predict_scores needs a two-class model (outputs of shape (n, 2)), got {tuple(out.shape)}")
    return torch.softmax(out.double(), dim=1)[:, 1].cpu().numpy()
