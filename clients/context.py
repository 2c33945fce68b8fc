"""What a site knows about itself: its node config, keys, policy and state directory.

The site administrator sets these on the SuperNode (``dmsc-fed client``); a
task from the server cannot change them.

Node config keys
----------------
``site-name``
    The site's name in the federation (required).
``data-path``
    The site's own CSV file, for CSV datasets.
``keys-dir``
    The site's key material (``OUT/sites/<site>`` of ``dmsc-fed keys init``).
``policy``
    The site's privacy policy file (TOML, see :mod:`dmsc_fed.privacy.policy`).
``state-dir``
    Where the site keeps its privacy ledger (default ``$FLWR_HOME/dmsc-fed``).
``device``
    Force a torch device (default: CUDA when available, else CPU).
``threads``
    Cap torch's CPU threads (the local launcher sets 1: its sites share a machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmsc_fed.errors import ConfigError
from dmsc_fed.privacy.policy import SitePolicy, load_policy
from dmsc_fed.security.provision import SiteKeys


def _path(node_config: dict[str, Any], key: str) -> Path | None:
    value = str(node_config.get(key, "") or "")
    return Path(value) if value else None


@dataclass(frozen=True)
class SiteContext:
    """The site's own settings, read from its SuperNode's node config."""

    name: str
    data_path: Path | None
    keys: SiteKeys | None
    policy: SitePolicy
    state_dir: Path
    device: str | None
    threads: int

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> SiteContext:
        """Read and check the node config (missing key files or a bad policy are errors)."""
        name = str(node_config.get("site-name", "") or "")
        if not name:
            raise ConfigError(
                "this SuperNode has no 'site-name' in its node config (set it with dmsc-fed client --site)"
            )
        keys_dir = _path(node_config, "keys-dir")
        policy_path = _path(node_config, "policy")
        state = _path(node_config, "state-dir") or Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / "dmsc-fed"
        return cls(
            name=name,
            data_path=_path(node_config, "data-path"),
            keys=SiteKeys.load(keys_dir) if keys_dir else None,
            policy=load_policy(policy_path) if policy_path else SitePolicy(),
            state_dir=state / name,
            device=str(node_config.get("device", "") or "") or None,
            threads=int(node_config.get("threads", 0) or 0),
        )

    def torch_device(self) -> Any:
        """The torch device to train on (CUDA when available unless the node config says otherwise)."""
        import torch

        from dmsc_fed.training import pick_device

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        return pick_device(self.device)
