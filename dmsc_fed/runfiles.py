"""Files of a run directory, written atomically or append-only.

Layout::

    OUT/config.json      the resolved federation config
    OUT/sites.json       the sites that joined and what they declared
    OUT/metrics.jsonl    one JSON object per round, appended as rounds finish
    OUT/model.pt         final global state dict (torch.load(..., weights_only=True))
    OUT/model.safetensors the same, as safetensors
    OUT/model-encrypted.safetensors  with encryption on: the CKKS-encrypted model (the server cannot read it)
    OUT/result.json      rounds completed, final metrics, rejected replies
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it to disk."""
    with path.open("a") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def save_model(out: Path, arrays: Mapping[str, NDArray[Any]]) -> None:
    """Save the final model as a torch state dict and as safetensors."""
    import torch
    from safetensors.torch import save_file

    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    torch.save(state, out / "model.pt")
    save_file(state, str(out / "model.safetensors"))


ENCRYPTED_MODEL = "model-encrypted.safetensors"


def save_encrypted_model(out: Path, arrays: Mapping[str, NDArray[Any]]) -> Path:
    """Save the encrypted global model (ciphertext chunks and their weight) as safetensors."""
    from safetensors.numpy import save_file

    path = out / ENCRYPTED_MODEL
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    return path


def decrypt_model_file(
    *, path: Path, secret_context: bytes, reference: Mapping[str, NDArray[Any]]
) -> dict[str, NDArray[Any]]:
    """Decrypt an encrypted global model with a site's CKKS secret context.

    ``reference`` is a state dict of the same architecture (its names, shapes and
    dtypes give the layout). Only a site, which holds the secret context, can do this.
    """
    from safetensors.numpy import load_file

    from dmsc_fed.privacy.he import decrypt, flatten, load_secret_context, unflatten
    from dmsc_fed.wire import CT_PREFIX, CT_WEIGHT

    stored = load_file(str(path))
    weight = float(stored[CT_WEIGHT][0])
    chunks = [stored[k].tobytes() for k in sorted(stored) if k.startswith(CT_PREFIX) and k != CT_WEIGHT]
    _, layout = flatten(reference)
    vector = decrypt(ctx=load_secret_context(secret_context), chunks=chunks, length=layout.size) / weight
    return unflatten(vector, layout)
