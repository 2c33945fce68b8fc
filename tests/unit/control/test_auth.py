"""API tokens (hashed, 0600 file, constant-time check) and the token-bucket rate limiter (draft 6.1.2)."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dmsc_fed.control.auth import (
    TOKEN_FILE_FORMAT,
    RateLimiter,
    RateSpec,
    TokenSet,
    create_token,
    hash_token,
    load_tokens,
    revoke_token,
)
from dmsc_fed.errors import ConfigError

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

# --------------------------------------------------------------------------- tokens


def test_hash_is_sha256_hex() -> None:
    # sha256("abc"), the FIPS 180-2 test vector.
    assert hash_token(secret="abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_created_token_verifies_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    secret = create_token(path=path, name="ci", clock=lambda: T0)
    assert len(secret) >= 43  # token_urlsafe(32): 256 bits
    text = path.read_text()
    assert secret not in text
    data = json.loads(text)
    assert data == {
        "format": TOKEN_FILE_FORMAT,
        "tokens": {"ci": {"sha256": hash_token(secret=secret), "created_at": "2025-01-01T12:00:00+00:00"}},
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    tokens = load_tokens(path=path)
    assert tokens.verify(secret=secret) == "ci"
    assert tokens.verify(secret=secret + "x") is None
    assert tokens.verify(secret="") is None


def test_tokens_are_random_and_named(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    ci = create_token(path=path, name="ci")
    coordinator = create_token(path=path, name="coordinator")
    assert ci != coordinator
    tokens = load_tokens(path=path)
    assert tokens.names == ("ci", "coordinator")
    assert (tokens.verify(secret=ci), tokens.verify(secret=coordinator)) == ("ci", "coordinator")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_taken_name_is_refused_unless_replaced(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    old = create_token(path=path, name="ci")
    with pytest.raises(ConfigError, match="token 'ci' already exists"):
        create_token(path=path, name="ci")
    assert load_tokens(path=path).verify(secret=old) == "ci"
    new = create_token(path=path, name="ci", replace=True)
    tokens = load_tokens(path=path)
    assert (tokens.verify(secret=new), tokens.verify(secret=old)) == ("ci", None)


def test_revoke_removes_a_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    ci = create_token(path=path, name="ci")
    other = create_token(path=path, name="other")
    revoke_token(path=path, name="ci")
    tokens = load_tokens(path=path)
    assert (tokens.verify(secret=ci), tokens.verify(secret=other)) == (None, "other")
    with pytest.raises(ConfigError, match="no token named 'ci'"):
        revoke_token(path=path, name="ci")


def test_the_file_is_tightened_to_0600_on_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    create_token(path=path, name="ci")
    path.chmod(0o644)
    create_token(path=path, name="other")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".tokens.json.tmp-*"))  # nothing left aside


@pytest.mark.parametrize("name", ["", "has space", "-dash-first", "a" * 65, "ünïcode", "a/b"])
def test_bad_token_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="token name"):
        create_token(path=tmp_path / "tokens.json", name=name)
    assert not (tmp_path / "tokens.json").exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json", "not valid JSON"),
        ("[]", "not a dmsc-fed token file"),
        ('{"format": "other", "tokens": {}}', "not a dmsc-fed token file"),
        (f'{{"format": "{TOKEN_FILE_FORMAT}", "tokens": []}}', "'tokens' must map"),
        (f'{{"format": "{TOKEN_FILE_FORMAT}", "tokens": {{"ci": {{}}}}}}', "has no 'sha256'"),
        (f'{{"format": "{TOKEN_FILE_FORMAT}", "tokens": {{"ci": {{"sha256": "xyz"}}}}}}', "64 lowercase hex"),
        (f'{{"format": "{TOKEN_FILE_FORMAT}", "tokens": {{"a b": {{"sha256": "{"0" * 64}"}}}}}}', "token name"),
    ],
)
def test_malformed_token_files_are_config_errors(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_tokens(path=path)


def test_a_missing_token_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_tokens(path=tmp_path / "absent.json")


def test_a_readable_token_file_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens.json"
    secret = create_token(path=path, name="ci")
    path.chmod(0o644)
    assert load_tokens(path=path).verify(secret=secret) == "ci"
    assert "should be 600" in caplog.text


def test_token_set_is_immutable_and_checks_every_hash() -> None:
    tokens = TokenSet.from_secrets(secrets={"a": "same-prefix-1", "b": "same-prefix-2"})
    assert tokens.verify(secret="same-prefix-2") == "b"
    with pytest.raises(TypeError):
        tokens.hashes["c"] = "0" * 64  # type: ignore[index]
    assert TokenSet().verify(secret="anything") is None


# --------------------------------------------------------------------------- rate limiting


class Ticker:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ticker() -> Ticker:
    return Ticker()


def test_bucket_sequence_by_hand(ticker: Ticker) -> None:
    # capacity 2, refill 0.5/s (one token per 2 s).
    limiter = RateLimiter(spec=RateSpec(capacity=2, refill_per_s=0.5), clock=ticker)
    assert limiter.take(key="k") == 0.0  # 2 -> 1
    assert limiter.take(key="k") == 0.0  # 1 -> 0
    assert limiter.take(key="k") == 2.0  # empty: one token in 2 s
    ticker.t = 1.0
    assert limiter.take(key="k") == 1.0  # 0.5 tokens: 0.5 more in 1 s
    ticker.t = 2.0
    assert limiter.take(key="k") == 0.0  # 1.0 -> 0
    ticker.t = 100.0
    assert limiter.tokens(key="k") == 2.0  # capped at capacity
    assert [limiter.take(key="k") for _ in range(3)] == [0.0, 0.0, 2.0]


def test_a_refused_request_takes_nothing(ticker: Ticker) -> None:
    limiter = RateLimiter(spec=RateSpec(capacity=1, refill_per_s=0.25), clock=ticker)
    assert limiter.take(key="k") == 0.0
    assert [limiter.take(key="k") for _ in range(5)] == [4.0] * 5
    ticker.t = 4.0
    assert limiter.take(key="k") == 0.0


def test_keys_have_their_own_buckets(ticker: Ticker) -> None:
    limiter = RateLimiter(spec=RateSpec(capacity=1, refill_per_s=1), clock=ticker)
    assert limiter.take(key="token:ci") == 0.0
    assert limiter.take(key="token:ci") == 1.0
    assert limiter.take(key="addr:10.0.0.7") == 0.0
    assert limiter.tokens(key="never-seen") == 1.0


def test_a_clock_going_backwards_refills_nothing(ticker: Ticker) -> None:
    limiter = RateLimiter(spec=RateSpec(capacity=1, refill_per_s=1), clock=ticker)
    ticker.t = 10.0
    assert limiter.take(key="k") == 0.0
    ticker.t = 5.0
    assert limiter.take(key="k") == 1.0


def test_bucket_table_is_bounded_dropping_full_buckets_first(ticker: Ticker) -> None:
    limiter = RateLimiter(spec=RateSpec(capacity=2, refill_per_s=1), clock=ticker, max_keys=2)
    limiter.take(key="a")
    limiter.take(key="a")  # a is empty
    limiter.take(key="b")  # b holds 1
    ticker.t = 1.0  # b is full again, a holds 1
    limiter.take(key="c")  # room is made by dropping b (full), not a
    assert len(limiter) == 2
    assert limiter.tokens(key="a") == 1.0
    limiter.take(key="a")  # a empty again, c holds 1: both below capacity
    limiter.take(key="d")  # the least recently used (c) goes
    assert len(limiter) == 2
    assert limiter.tokens(key="a") == 0.0
    assert limiter.tokens(key="d") == 1.0


@pytest.mark.parametrize(
    ("capacity", "refill"),
    [(0, 1), (0.5, 1), (1, 0), (1, -1), (float("inf"), 1), (1, float("nan"))],
)
def test_bad_rate_specs_are_refused(capacity: float, refill: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        RateSpec(capacity=capacity, refill_per_s=refill)
