"""Files of a run directory, written atomically or append-only.

Layout::

    OUT/config.json      the resolved federation config
    OUT/sites.json       the sites that joined and what they declared
    OUT/metrics.jsonl    one JSON object per round, appended as rounds finish
    OUT/model.pt         final global state dict (torch.load(..., weights_only=True))
    OUT/model.safetensors the same, as safetensors
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
