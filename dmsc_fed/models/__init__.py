"""The model zoo: small, Opacus-compatible models built by name."""

from dmsc_fed.models.zoo import MODELS, build_model

__all__ = ["MODELS", "build_model"]
