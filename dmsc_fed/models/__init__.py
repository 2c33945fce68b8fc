"""The model zoo: small, Opacus-compatible models built by name, and their layer profiles."""

from dmsc_fed.models.profile import LayerInfo, LayerProfile, profile_layers
from dmsc_fed.models.zoo import MODELS, MultiTaskNet, TaskView, build_model, task_view

__all__ = [
    "MODELS",
    "LayerInfo",
    "LayerProfile",
    "MultiTaskNet",
    "TaskView",
    "build_model",
    "profile_layers",
    "task_view",
]
