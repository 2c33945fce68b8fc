from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from dmsc_fed.errors import PrivacyError
from dmsc_fed.privacy.signing import Binding, create_signing_key, load_signing_key, load_verify_key, sign, verify


@pytest.fixture
def keys(tmp_path: Path):
    for site in ("a", "b"):
        create_signing_key(private=tmp_path / f"{site}.key", public=tmp_path / f"{site}.pub")
    return {s: (load_signing_key(tmp_path / f"{s}.key"), load_verify_key(tmp_path / f"{s}.pub")) for s in ("a", "b")}


def _content() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({"ct-00000": Array(np.arange(64, dtype=np.uint8))}),
            "metrics": MetricRecord({"num-examples": 10, "weight": 0.25}),
        }
    )


B = Binding(task="hospital/7", round=3, site="a", stage="train")


def test_valid_signature(keys) -> None:
    c = _content()
    sign(c, binding=B, key=keys["a"][0])
    assert verify(c, expected=B, key=keys["a"][1]) is None


def test_flipped_ciphertext_bit_is_rejected(keys) -> None:
    c = _content()
    sign(c, binding=B, key=keys["a"][0])
    data = c["arrays"]["ct-00000"].numpy().copy()
    data[5] ^= 1
    c["arrays"]["ct-00000"] = Array(data)
    assert "invalid signature" in (verify(c, expected=B, key=keys["a"][1]) or "")


def test_changed_metric_is_rejected(keys) -> None:
    c = _content()
    sign(c, binding=B, key=keys["a"][0])
    c["metrics"]["weight"] = 0.9
    assert "invalid signature" in (verify(c, expected=B, key=keys["a"][1]) or "")


def test_forged_sender(keys) -> None:
    # Site b signs as b, but the update arrives from the node that joined as a.
    c = _content()
    sign(c, binding=Binding(task=B.task, round=B.round, site="b", stage="train"), key=keys["b"][0])
    assert "signed as site 'b'" in (verify(c, expected=B, key=keys["a"][1]) or "")
    # Site b claims to be a but has only its own key.
    c = _content()
    sign(c, binding=B, key=keys["b"][0])
    assert "invalid signature" in (verify(c, expected=B, key=keys["a"][1]) or "")


@pytest.mark.parametrize(
    ("binding", "needle"),
    [
        (Binding(task=B.task, round=2, site="a", stage="train"), "stale update: bound to round 2, this is round 3"),
        (Binding(task="hospital/6", round=3, site="a", stage="train"), "bound to task 'hospital/6'"),
        (Binding(task=B.task, round=3, site="a", stage="evaluate"), "bound to stage 'evaluate'"),
    ],
)
def test_replayed_update_is_rejected(keys, binding: Binding, needle: str) -> None:
    c = _content()
    sign(c, binding=binding, key=keys["a"][0])
    assert needle in (verify(c, expected=B, key=keys["a"][1]) or "")


def test_unsigned_and_bad_key_files(keys, tmp_path: Path) -> None:
    assert verify(_content(), expected=B, key=keys["a"][1]) == "the update is not signed"
    with pytest.raises(PrivacyError, match="not found"):
        load_signing_key(tmp_path / "missing.key")
    (tmp_path / "junk.pub").write_text("junk")
    with pytest.raises(PrivacyError, match="cannot read"):
        load_verify_key(tmp_path / "junk.pub")


@pytest.mark.parametrize("claimed", ["x", [3], 3.0, True])
def test_a_signature_whose_round_is_not_an_integer_is_a_reason_not_a_crash(keys, claimed: object) -> None:
    c = _content()
    sign(c, binding=B, key=keys["a"][0])
    c["signature"]["round"] = claimed  # type: ignore[index]
    reason = verify(c, expected=B, key=keys["a"][1])
    assert reason is not None and "round is not an integer" in reason
