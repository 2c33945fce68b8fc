"""Privacy wrappers around what a site does: DP-SGD within budget, encryption, signatures.

Each wrapper fails closed: if DP, encryption or signing cannot be applied, it
raises, the ClientApp replies with an error, and no update leaves the site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from numpy.typing import NDArray
from torch import nn

from clients.context import SiteContext
from dmsc_fed.config import FederationConfig
from dmsc_fed.data import SiteData
from dmsc_fed.errors import PrivacyError
from dmsc_fed.privacy import dp
from dmsc_fed.privacy.signing import Binding, load_signing_key, sign
from dmsc_fed.segmentation.layout import SegmentLayout, is_segment_key, open_segments
from dmsc_fed.training import FitResult, train
from dmsc_fed.wire import CT_PREFIX, CT_WEIGHT, EPSILON_KEY, EPSILON_TOTAL_KEY

LEDGER_FILE = "privacy-ledger.json"


@dataclass(frozen=True)
class Refusal:
    """The site will not train this round, and why."""

    reason: str
    metrics: dict[str, float]


def _he_context(site: SiteContext) -> Any:
    from dmsc_fed.privacy.he import load_secret_context

    if site.keys is None:
        raise PrivacyError("the task uses encryption but this site has no key material (keys-dir)")
    return load_secret_context(site.keys.he_secret.read_bytes())


def is_encrypted(arrays: ArrayRecord) -> bool:
    """Whether a global model arrived as CKKS ciphertexts."""
    return CT_WEIGHT in arrays


def open_global(
    arrays: ArrayRecord, *, model: nn.Module, site: SiteContext, layout: SegmentLayout | None = None
) -> dict[str, Any]:
    """The global model's state dict, decrypting it (or its encrypted segments) if it arrived encrypted."""
    import torch

    if layout is not None:
        values = {k: a.numpy() for k, a in arrays.items()}
        ctx = _he_context(site) if any(is_segment_key(k) for k in values) else None
        state = open_segments(values=values, layout=layout, ctx=ctx)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    if not is_encrypted(arrays):
        return dict(arrays.to_torch_state_dict())

    from dmsc_fed.privacy.he import decrypt_model

    values = {k: a.numpy() for k, a in arrays.items()}
    reference = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    state = decrypt_model(values=values, reference=reference, ctx=_he_context(site))
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def encrypter(site: SiteContext) -> Callable[[NDArray[np.float64]], list[bytes]]:
    """``values -> ciphertext chunks`` with the site's CKKS secret context (PrivacyError without keys)."""
    from dmsc_fed.privacy.he import encrypt

    ctx = _he_context(site)
    return lambda values: encrypt(ctx=ctx, values=values)


def seal_update(*, model: nn.Module, cfg: FederationConfig, site: SiteContext, weight: float) -> ArrayRecord:
    """The update to send: plaintext arrays, or CKKS ciphertexts of ``weight * parameters``."""
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if cfg.privacy.encryption == "off":
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
    from dmsc_fed.privacy.he import encrypt, flatten

    vector, _ = flatten(state)
    chunks = encrypt(ctx=_he_context(site), values=vector * weight)
    return ArrayRecord({f"{CT_PREFIX}{i:05d}": Array(np.frombuffer(c, dtype=np.uint8)) for i, c in enumerate(chunks)})


def sign_reply(content: RecordDict, *, cfg: FederationConfig, site: SiteContext, binding: Binding) -> RecordDict:
    """Sign ``content`` with the site's key; without keys, only a task with no privacy settings may go unsigned."""
    if site.keys is None:
        if cfg.uses_dp or cfg.uses_encryption:
            raise PrivacyError("the task asks for privacy but this site has no key material to sign its updates")
        return content
    sign(content, binding=binding, key=load_signing_key(site.keys.signing_key))
    return content


def fit(
    *,
    model: nn.Module,
    cfg: FederationConfig,
    data: SiteData,
    site: SiteContext,
    task_id: str,
    server_round: int,
    seed: int,
    dp_on: bool | None = None,
) -> tuple[FitResult, dict[str, float]] | Refusal:
    """Train this round: plain SGD, or DP-SGD if the task asks, within the task's and the site's budgets.

    ``dp_on`` overrides the task's ``privacy.dp`` (segmented training decides per site
    from its segments); the noise settings are always the task's.
    """
    p = cfg.privacy
    if not (p.dp == "on" if dp_on is None else dp_on):
        return train(model=model, x=data.x_train, y=data.y_train, cfg=cfg, device=site.torch_device(), seed=seed), {}
    ledger = dp.PrivacyLedger(site.state_dir / LEDGER_FILE)
    own = [e for e in ledger.entries if e.task == task_id]
    spent = dp.epsilon_of(own, delta=p.delta, accountant=p.accountant)
    spent_site = ledger.epsilon(delta=p.delta, accountant=p.accountant)
    plan = dp.plan(cfg, num_train=data.num_train)
    sigma, rate, steps = plan.noise_multiplier, plan.sample_rate, plan.steps
    now = {EPSILON_KEY: spent, EPSILON_TOTAL_KEY: spent_site}
    if sigma < site.policy.min_noise_multiplier:
        return Refusal(
            f"noise multiplier {sigma:.3f} is below the site's minimum {site.policy.min_noise_multiplier}", now
        )
    entry = dp.LedgerEntry(task=task_id, round=server_round, noise_multiplier=sigma, sample_rate=rate, steps=steps)
    after = dp.epsilon_of([*own, entry], delta=p.delta, accountant=p.accountant)
    budget = p.budget
    if budget is not None and after > budget * (1 + 1e-3):
        return Refusal(f"privacy budget: this round would take epsilon to {after:.3f} > the task's {budget:g}", now)
    cap = site.policy.max_epsilon
    after_site = ledger.epsilon(delta=p.delta, accountant=p.accountant, extra=entry)
    if cap is not None and after_site > cap * (1 + 1e-3):
        return Refusal(f"privacy budget: this round would take the site's epsilon to {after_site:.3f} > {cap:g}", now)
    result, done = dp.train_private(
        model=model,
        x=data.x_train,
        y=data.y_train,
        cfg=cfg,
        device=site.torch_device(),
        seed=seed,
        noise_multiplier=sigma,
        max_grad_norm=p.max_grad_norm,
        accountant=p.accountant,
    )
    ledger.record(
        dp.LedgerEntry(
            task=task_id,
            round=server_round,
            noise_multiplier=done.noise_multiplier,
            sample_rate=done.sample_rate,
            steps=done.steps,
        )
    )
    spent = dp.epsilon_of([e for e in ledger.entries if e.task == task_id], delta=p.delta, accountant=p.accountant)
    return result, {
        EPSILON_KEY: spent,
        EPSILON_TOTAL_KEY: ledger.epsilon(delta=p.delta, accountant=p.accountant),
        "delta": p.delta,
        "noise-multiplier": sigma,
    }
