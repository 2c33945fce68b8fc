from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmsc_fed.config import FederationConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent


def make_config(**overrides: Any) -> FederationConfig:
    data: dict[str, Any] = {
        "name": "t",
        "seed": 3,
        "rounds": 2,
        "local_epochs": 1,
        "batch_size": 16,
        "learning_rate": 0.1,
        "sites": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
        "dataset": {"name": "breast_cancer", "partitioning": "iid"},
        "model": {"name": "logreg"},
    }
    data.update(overrides)
    return parse_config(data=data)


@pytest.fixture
def cfg() -> FederationConfig:
    return make_config()


@pytest.fixture
def flwr_identity() -> Iterator[None]:
    """Flower messages need a task identity outside a runtime (see docs/notes)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    yield
