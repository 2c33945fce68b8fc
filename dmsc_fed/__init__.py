"""dmsc-fed: federated, privacy-preserving training for hospitals and banks.

The core package. It holds configuration, data loading, the model zoo, local
training, the launcher and the CLI. It imports nothing from ``server``,
``clients`` or ``strategies``; heavy dependencies (torch, flwr) are imported by
the submodules that need them, so ``import dmsc_fed`` stays quick.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
