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

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for logs and ``summary.json``."""
        return asdict(self)
