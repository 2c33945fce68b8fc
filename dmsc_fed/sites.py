"""What a site tells the server when it joins a run (draft section 6.1.3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SiteInfo:
    """A site's declaration at join time.

    The server bounds every later reply by it: a site may not claim more
    training or test samples than it declared here.
    """

    name: str
    node_id: int
    num_train: int
    num_test: int
    device: str
    version: str
    cpu_cores: int | None = None
    gpu_memory_mb: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for logs and ``summary.json``."""
        return asdict(self)


def hardware_capabilities() -> dict[str, int]:
    """What this machine offers, for a site's join declaration: CPU cores, and GPU memory when CUDA is present."""
    import os

    out = {"cpu-cores": os.cpu_count() or 1}
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu-memory-mb"] = int(torch.cuda.get_device_properties(0).total_memory // 2**20)
    except Exception:  # no torch or no driver: no GPU to declare
        pass
    return out


def hardware_load() -> dict[str, float]:
    """Resources this process used, for a site's reply (draft 6.2.3): CPU seconds, peak memory, peak GPU memory."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"cpu-seconds": usage.ru_utime + usage.ru_stime, "max-rss-mb": usage.ru_maxrss / 1024.0}
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu-max-memory-mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception:
        pass
    return out
