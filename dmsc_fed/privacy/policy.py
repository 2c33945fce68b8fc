"""The site administrator's privacy policy: what any task may ask of this site.

The policy file is given to the site's SuperNode (``dmsc-fed client --policy``)
and read at the site for every message. Nothing in the server's config can lower
it: a task that asks for weaker privacy is refused with the reason.

Example ``policy.toml``::

    min_noise_multiplier = 0.8
    max_epsilon = 3.0          # total spend of this site's data, across tasks
    max_delta = 1e-5
    require_dp = true
    require_encryption = true
    allowed_models = ["logreg", "mlp"]
    allowed_tasks = ["hospital*"]
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dmsc_fed.config import FederationConfig
from dmsc_fed.errors import PrivacyError


class SitePolicy(BaseModel):
    """Bounds a site puts on every task (frozen; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_noise_multiplier: Annotated[float, Field(ge=0.0)] = 0.0
    max_epsilon: Annotated[float, Field(gt=0.0)] | None = None
    max_delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    require_dp: bool = False
    require_encryption: bool = False
    allowed_models: list[str] | None = None
    allowed_tasks: list[str] | None = None


def load_policy(path: Path) -> SitePolicy:
    """Read a policy file; every problem is a PrivacyError naming the file and field."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PrivacyError(f"site policy file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PrivacyError(f"cannot read site policy {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise PrivacyError(f"site policy {path} is not valid TOML: {err}") from None
    try:
        return SitePolicy.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: "
            + ("unknown field" if e["type"] == "extra_forbidden" else e["msg"])
            for e in err.errors()
        )
        raise PrivacyError(f"site policy {path} is invalid: {problems}") from None


def refusal(policy: SitePolicy, cfg: FederationConfig) -> str | None:
    """Why this site refuses task ``cfg`` under ``policy``, or None if it may take part."""
    p = cfg.privacy
    if policy.allowed_tasks is not None and not any(fnmatch.fnmatchcase(cfg.name, pat) for pat in policy.allowed_tasks):
        return f"task {cfg.name!r} is not among the site's allowed tasks {policy.allowed_tasks}"
    if policy.allowed_models is not None and cfg.model.name not in policy.allowed_models:
        return f"model {cfg.model.name!r} is not among the site's allowed models {policy.allowed_models}"
    if policy.require_encryption and p.encryption == "off":
        return "the site requires encrypted updates but the task has encryption off"
    if p.dp == "off":
        if policy.require_dp or policy.max_epsilon is not None or policy.min_noise_multiplier > 0:
            return "the site requires differential privacy but the task has dp off"
        return None
    if p.delta > policy.max_delta:
        return f"the task's delta {p.delta:g} exceeds the site's maximum {policy.max_delta:g}"
    if p.noise_multiplier is not None and p.noise_multiplier < policy.min_noise_multiplier:
        return (
            f"the task's noise multiplier {p.noise_multiplier:g} is below the site's minimum "
            f"{policy.min_noise_multiplier:g}"
        )
    if policy.max_epsilon is not None and p.target_epsilon is not None and p.target_epsilon > policy.max_epsilon:
        return f"the task's target epsilon {p.target_epsilon:g} exceeds the site's maximum {policy.max_epsilon:g}"
    return None


def segment_refusal(policy: SitePolicy, *, segments: dict[str, tuple[bool, bool]]) -> str | None:
    """Why the site refuses to train its segments, given as ``name -> (dp, encrypted)``; None if it may.

    In a segmented task a segment may turn DP or encryption off for itself; the site's
    policy still holds for everything the site sends.
    """
    if policy.require_encryption:
        plain = sorted(name for name, (_, encrypted) in segments.items() if not encrypted)
        if plain:
            return f"the site requires encrypted updates but segment(s) {plain} travel in clear"
    wants_dp = policy.require_dp or policy.max_epsilon is not None or policy.min_noise_multiplier > 0
    if wants_dp and segments and not any(dp for dp, _ in segments.values()):
        return "the site requires differential privacy but none of its segments asks for DP"
    return None
