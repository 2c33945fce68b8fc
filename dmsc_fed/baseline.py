"""Centralized baseline: the same model trained on all sites' pooled training data.

Only a local run can compute it (a real federation never pools data). It gives
the figure the federated model is compared against in ``summary.json``.
"""

from __future__ import annotations

from dmsc_fed.config import FederationConfig
from dmsc_fed.data import pooled_data
from dmsc_fed.training import EvalResult, evaluate, model_for, pick_device, train


def centralized_baseline(*, cfg: FederationConfig, task: str | None = None) -> EvalResult:
    """Train on the pooled training splits for ``rounds * local_epochs`` epochs; test on the pooled test splits.

    In business mode ``task`` names one task: the data of the sites holding it, and the
    model's view for that task (backbone and that head).
    """
    from dmsc_fed.models.zoo import task_view

    data = pooled_data(cfg=cfg, task=task)
    net = model_for(cfg, seed=cfg.seed)
    model = net if task is None else task_view(model=net, task=task)
    device = pick_device()
    pooled_cfg = cfg.model_copy(update={"local_epochs": cfg.rounds * cfg.local_epochs})
    train(model=model, x=data.x_train, y=data.y_train, cfg=pooled_cfg, device=device, seed=cfg.seed)
    return evaluate(model=model, x=data.x_test, y=data.y_test, device=device)
