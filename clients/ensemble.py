"""The site's half of a voting ensemble (see :mod:`strategies.ensemble`).

The global record holds every site's model as ``member/<site>/<parameter>``. A site
trains its own member (any member when it has none yet, e.g. after joining late) and
evaluates the ensemble on its held-out split by majority or soft voting
(:mod:`dmsc_fed.voting`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from numpy.typing import NDArray
from torch import nn

from dmsc_fed.errors import ConfigError
from dmsc_fed.voting import majority_vote, soft_vote
from dmsc_fed.wire import MEMBER_PREFIX


def is_ensemble(arrays: ArrayRecord) -> bool:
    """Whether a global record is a voting ensemble's members."""
    return any(k.startswith(MEMBER_PREFIX) for k in arrays)


def members(arrays: ArrayRecord) -> dict[str, dict[str, torch.Tensor]]:
    """Site -> its member's state dict."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, array in arrays.items():
        if not key.startswith(MEMBER_PREFIX):
            raise ConfigError(f"an ensemble record holds a key outside its members: {key!r}")
        site, _, param = key.removeprefix(MEMBER_PREFIX).partition("/")
        out.setdefault(site, {})[param] = torch.from_numpy(np.ascontiguousarray(array.numpy()))
    return out


def own_member(arrays: ArrayRecord, *, site: str) -> dict[str, torch.Tensor]:
    """The member this site trains: its own, or the first one when it has none yet."""
    found = members(arrays)
    return found[site] if site in found else found[sorted(found)[0]]


def vote(
    *, arrays: ArrayRecord, build: Any, x: NDArray[np.float32], voting: str, device: torch.device
) -> NDArray[np.float64]:
    """The ensemble's class probabilities on ``x``: soft-vote probabilities, or the hard votes' shares.

    ``build()`` returns a fresh model of the task's architecture to load each member into.
    """
    probs: list[NDArray[np.float64]] = []
    for state in members(arrays).values():
        model: nn.Module = build()
        model.load_state_dict(state)
        model.to(device).eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(x).to(device))
        probs.append(torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64))
    if voting == "soft":
        return soft_vote(probabilities=probs)
    classes = probs[0].shape[1]
    labels = majority_vote(predictions=[p.argmax(axis=1) for p in probs], num_classes=classes)
    shares = np.zeros((x.shape[0], classes))
    for p in probs:
        shares[np.arange(x.shape[0]), p.argmax(axis=1)] += 1.0 / len(probs)
    shares[np.arange(x.shape[0]), labels] += 1e-9  # the vote's winner (ties: smallest class) on top
    out: NDArray[np.float64] = shares / shares.sum(axis=1, keepdims=True)
    return out
