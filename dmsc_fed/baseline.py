"""Centralized baseline: the same model trained on all sites' pooled training data.

Only a local run can compute it (a real federation never pools data). It gives
the figure the federated model is compared against in ``summary.json``.
"""

from __future__ import annotations

from dmsc_fed.config import FederationConfig
from dmsc_fed.data import pooled_data
from dmsc_fed.training import EvalResult, evaluate, model_for, pick_device, train


def centralized_baseline(*, cfg: FederationConfig) -> EvalResult:
    """Train on the pooled training splits for ``rounds * local_epochs`` epochs; test on the pooled test splits."""
    data = pooled_data(cfg=cfg)
    model = model_for(cfg, seed=cfg.seed)
    device = pick_device()
    pooled_cfg = cfg.model_copy(update={"local_epochs": cfg.rounds * cfg.local_epochs})
    train(model=model, x=data.x_train, y=data.y_train, cfg=pooled_cfg, device=device, seed=cfg.seed)
    return evaluate(model=model, x=data.x_test, y=data.y_test, device=device)
