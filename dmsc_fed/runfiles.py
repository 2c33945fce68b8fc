"""Files of a run directory, written atomically or append-only.

Layout::

    OUT/config.json      the resolved federation config
    OUT/sites.json       the sites that joined and what they declared
    OUT/segments.json    segmented tasks: every segment's parameter pieces, sites, privacy and rule
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
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from dmsc_fed.segmentation.layout import SegmentLayout


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
    *, path: Path, secret_context: bytes, reference: Mapping[str, NDArray[Any]], layout: SegmentLayout | None = None
) -> dict[str, NDArray[Any]]:
    """Decrypt an encrypted global model with a site's CKKS secret context.

    ``reference`` is a state dict of the same architecture (its names, shapes and
    dtypes give the layout). Only a site, which holds the secret context, can do this.
    A segmented model (``layout`` given) has its encrypted segments decrypted into place.
    """
    from safetensors.numpy import load_file

    from dmsc_fed.privacy.he import decrypt_model, load_secret_context

    stored = load_file(str(path))
    ctx = load_secret_context(secret_context)
    if layout is not None:
        from dmsc_fed.segmentation.layout import open_segments

        return open_segments(values=stored, layout=layout, ctx=ctx)
    return decrypt_model(values=stored, reference=reference, ctx=ctx)
