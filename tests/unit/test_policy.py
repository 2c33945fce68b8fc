from __future__ import annotations

from pathlib import Path

import pytest

from dmsc_fed.errors import PrivacyError
from dmsc_fed.privacy.policy import SitePolicy, load_policy, refusal
from tests.conftest import make_config

STRICT = SitePolicy(
    min_noise_multiplier=0.8,
    max_epsilon=3.0,
    max_delta=1e-5,
    require_dp=True,
    require_encryption=True,
    allowed_models=["logreg"],
    allowed_tasks=["hosp*"],
)
OK_PRIVACY = {"dp": "on", "target_epsilon": 2.0, "delta": 1e-5, "encryption": "ckks"}


def test_a_task_within_the_policy_is_accepted() -> None:
    assert refusal(STRICT, make_config(name="hospital", privacy=OK_PRIVACY)) is None
    assert refusal(SitePolicy(), make_config()) is None


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"name": "bank"}, "not among the site's allowed tasks"),
        ({"model": {"name": "mlp"}}, "not among the site's allowed models"),
        ({"privacy": OK_PRIVACY | {"encryption": "off"}}, "requires encrypted updates"),
        ({"privacy": {"dp": "off", "encryption": "ckks"}}, "requires differential privacy"),
        ({"privacy": OK_PRIVACY | {"delta": 1e-3}}, "delta 0.001 exceeds"),
        ({"privacy": OK_PRIVACY | {"target_epsilon": 8.0}}, "target epsilon 8 exceeds"),
        ({"privacy": {"dp": "on", "noise_multiplier": 0.5, "encryption": "ckks"}}, "noise multiplier 0.5 is below"),
    ],
)
def test_weaker_tasks_are_refused_with_the_reason(overrides: dict, needle: str) -> None:
    data = {"name": "hospital", "privacy": OK_PRIVACY} | overrides
    reason = refusal(STRICT, make_config(**data))
    assert reason is not None and needle in reason


def test_policy_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    p.write_text("max_epsilon = 2.0\nallow_everything = true\n")
    with pytest.raises(PrivacyError, match="allow_everything: unknown field"):
        load_policy(p)
    p.write_text("max_epsilon = -1\n")
    with pytest.raises(PrivacyError, match="max_epsilon"):
        load_policy(p)
    with pytest.raises(PrivacyError, match="not found"):
        load_policy(tmp_path / "none.toml")
    p.write_text("min_noise_multiplier = 1.0\nrequire_encryption = true\n")
    assert load_policy(p).require_encryption
