r"""The site's half of encrypted FedAtt (see :mod:`strategies.encrypted_attention`).

Phase 1 (``attention-phase = "scores"``): after training, the site keeps the global
model :math:`w` it received and its trained model :math:`w_k` in its state directory
(``npz``, no pickle) and reports only the per-tensor distances
:math:`\lVert w^l - w_k^l \rVert_2`. Phase 2 (``"combine"``): it receives its softmax
weights :math:`\alpha_k^l` and the step :math:`\epsilon`, and sends the CKKS ciphertexts
of :math:`\alpha_k^l ((1 - \epsilon) w^l + \epsilon w_k^l)`, then deletes the saved pair.
Phase 2 is post-processing of the DP-trained :math:`w_k` and the global model every
site already holds: it spends no privacy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dmsc_fed.errors import ConfigError, PrivacyError


def _pair_path(state_dir: Path, task_id: str, server_round: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task_id)
    return state_dir / "attention" / f"{safe}-round-{server_round}.npz"


def distances(*, server: Mapping[str, NDArray[Any]], local: Mapping[str, NDArray[Any]]) -> list[float]:
    """``||w^l - w_k^l||_2`` per tensor, in the order of ``server``."""
    return [
        float(np.linalg.norm((np.asarray(w, np.float64) - np.asarray(local[k], np.float64)).ravel()))
        for k, w in server.items()
    ]


def save_pair(
    *,
    state_dir: Path,
    task_id: str,
    server_round: int,
    server: Mapping[str, NDArray[Any]],
    local: Mapping[str, NDArray[Any]],
) -> Path:
    """Keep ``w`` and ``w_k`` until phase 2 (arrays ``g0..``/``l0..`` in state-dict order)."""
    path = _pair_path(state_dir, task_id, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"g{i}": np.asarray(v) for i, v in enumerate(server.values())}
    arrays |= {f"l{i}": np.asarray(local[k]) for i, k in enumerate(server)}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)
    return path


def share(
    *,
    state_dir: Path,
    task_id: str,
    server_round: int,
    weights: Sequence[float],
    step_size: float,
    encrypt: Callable[[NDArray[np.float64]], list[bytes]],
) -> list[bytes]:
    """Phase 2: the encrypted share ``alpha^l ((1 - eps) w^l + eps w_k^l)``, flattened in state-dict order.

    Raises
    ------
    ConfigError
        The saved pair is missing (phase 1 did not run here) or the weights do not fit it.
    PrivacyError
        Encryption failed (nothing is sent).

    """
    path = _pair_path(state_dir, task_id, server_round)
    if not path.exists():
        raise ConfigError(f"no phase-1 state for task {task_id!r} round {server_round} at {path}")
    if not (math.isfinite(step_size) and 0 < step_size <= 1):
        raise ConfigError(f"attention step size {step_size!r} is not in (0, 1]")
    with np.load(path, allow_pickle=False) as saved:
        count = sum(1 for k in saved.files if k.startswith("g"))
        if len(weights) != count or not all(math.isfinite(a) and 0 <= a <= 1 for a in weights):
            raise ConfigError(f"attention weights {list(weights)[:4]}... do not fit the {count} saved tensors")
        parts = [
            weights[i] * ((1 - step_size) * saved[f"g{i}"].astype(np.float64) + step_size * saved[f"l{i}"])
            for i in range(count)
        ]
    vector = np.concatenate([p.ravel() for p in parts])
    try:
        chunks = encrypt(vector)
    except PrivacyError:
        raise
    path.unlink(missing_ok=True)
    return chunks
