"""Control API: authentication, rate limiting, validation, tasks, exception queue, models, metrics (draft 6.1.2, 6.2.4).

Every test runs the real app (FastAPI's TestClient) over a real SQLite store file in
``tmp_path``. Bad input gets a clear 4xx and leaves what is stored untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from dmsc_fed.config import FederationConfig, parse_config
from dmsc_fed.control import (
    ContentHashMismatchError,
    IllegalTransitionError,
    MigrationError,
    SchemaTooNewError,
    SiteKeyMismatchError,
    Store,
    StoreError,
    StoreUnreachableError,
    UnknownPoolError,
    UnknownSiteError,
    UnknownTaskError,
    UnknownVersionError,
    read_export,
    sqlite_url,
)
from dmsc_fed.control.api import create_app, status_for, task_validator
from dmsc_fed.control.auth import RateSpec, TokenSet
from dmsc_fed.errors import ConfigError, DmscError, ModelError

from .conftest import FakeClock

TOKEN = "test-token-secret"
OTHER = "other-token-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SMALL = {"sites": [{"name": "a"}, {"name": "b"}], "dataset": {"name": "breast_cancer"}, "model": {"name": "logreg"}}
BAD_SEGMENTATION = {"mode": "block", "block": {"block_count": 4, "replication": 3}}
ROUND: dict[str, Any] = {
    "round": 3,
    "seconds": 1.5,
    "participants": 2,
    "bytes_up": 2048,
    "bytes_down": 4096,
    "accuracy": 0.75,
    "loss": 0.5,
    "epsilon": {"a": 0.25, "b": 0.5},
    "hardware": {"a": {"cpu-seconds": 12.5, "max-rss-mb": 300.0}},
}


def fast_validator(config: dict[str, Any]) -> FederationConfig:
    """parse_config alone: for tests that are about the API, not about check_task."""
    return parse_config(data=config, source="config")


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.arange(2, dtype=np.float64)}


def seed_store(store: Store) -> dict[str, int]:
    """Pools, sites and tasks in every state the API distinguishes, model versions, round events."""
    config_json = fast_validator(SMALL).to_json()
    store.registry.define_pool(name="gpu", device="cuda", capacity=2)
    store.registry.define_pool(name="cpu", device="cpu", capacity=4)
    store.registry.register_site(name="a", node_id=1, software_version="0.1.0", pool="gpu", device="cuda")
    store.registry.register_site(name="b", node_id=2, software_version="0.1.0", pool="cpu")
    store.registry.reply_missed(site="b")  # suspect
    q = store.queue
    ids = {
        "queued": q.submit(kind="train", config_json=config_json, submitter="alice", pools_needed=["cpu"]),
        "dead": q.submit(kind="train", config_json=config_json, submitter="alice", max_attempts=1),
        "failed": q.submit(kind="evaluate", config_json=config_json, submitter="bob", max_attempts=3),
        "succeeded": q.submit(kind="train", config_json=config_json, submitter="bob"),
        "cancelled": q.submit(kind="train", config_json=config_json, submitter="bob"),
    }
    q.mark_running(task_id=ids["dead"])
    q.mark_failed(task_id=ids["dead"], exc_type="RuntimeError", message="site a crashed", log_tail="...\nboom")
    q.mark_running(task_id=ids["failed"])
    q.mark_failed(task_id=ids["failed"], exc_type="TimeoutError", message="round 2 timed out")
    q.mark_running(task_id=ids["succeeded"])
    q.mark_succeeded(task_id=ids["succeeded"])
    q.cancel(task_id=ids["cancelled"])
    for rnd in (1, 2):
        store.models.add_version(
            task_id=ids["queued"],
            round=rnd,
            arrays=weights(rnd),
            metrics={"accuracy": 0.5 + rnd / 10},
            sites=["a", "b"],
            epsilon={"a": 0.1 * rnd},
        )
    store.events.log_event(kind="round", task_id=ids["queued"], **(ROUND | {"round": 2}))
    store.events.log_event(kind="round", task_id=ids["queued"], **ROUND)
    store.events.log_event(kind="round", task_id=ids["dead"], round=1, seconds=0.5)
    return ids


@pytest.fixture
def api_store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    store = Store.open(sqlite_url(tmp_path / "control.db"), clock=clock, seed=0)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def ids(api_store: Store) -> dict[str, int]:
    return seed_store(api_store)


def make_client(store: Store, **kw: Any) -> TestClient:
    kw.setdefault("tokens", TokenSet.from_secrets(secrets={"ci": TOKEN, "coordinator": OTHER}))
    return TestClient(create_app(store=store, **kw))


@pytest.fixture
def client(api_store: Store) -> TestClient:
    """The app with the real task validator (parse_config, then check_task)."""
    return make_client(api_store)


@pytest.fixture
def fast_client(api_store: Store) -> TestClient:
    return make_client(api_store, validate_task=fast_validator)


def stored_tasks(store: Store) -> list[tuple[int, str, str]]:
    return [(t.id, t.state, t.config_json) for t in store.queue.tasks()]


def detail_text(response: Any) -> str:
    """All messages of an error body, for matching (FastAPI's list or our string)."""
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else "\n".join(e["msg"] for e in detail)


# --------------------------------------------------------------------------- authentication


def test_health_needs_no_token(client: TestClient) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "version": "0.1.0"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/tasks"),
        ("POST", "/v1/tasks"),
        ("GET", "/v1/tasks/1"),
        ("POST", "/v1/tasks/1/cancel"),
        ("GET", "/v1/tasks/dead"),
        ("POST", "/v1/tasks/1/replay"),
        ("GET", "/v1/sites"),
        ("GET", "/v1/pools"),
        ("GET", "/v1/models?task_id=1"),
        ("GET", "/v1/models/1/export"),
        ("POST", "/v1/models/1/rollback"),
        ("GET", "/v1/events"),
        ("GET", "/metrics"),
        ("GET", "/v1/no-such-route"),
    ],
)
def test_missing_token_is_401_with_a_bearer_challenge(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="dmsc-fed"'
    assert response.json() == {"detail": "missing bearer token", "error": "Unauthorized"}


@pytest.mark.parametrize(
    "header",
    [
        "Bearer wrong-secret",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        "Bearer ",
        "Bearer",
        f"{TOKEN}",
    ],
)
def test_invalid_token_is_401(client: TestClient, api_store: Store, header: str) -> None:
    response = client.get("/v1/tasks", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["detail"] == "invalid bearer token"


def test_valid_tokens_are_accepted_and_named(client: TestClient, api_store: Store) -> None:
    assert client.get("/v1/tasks", headers=AUTH).json() == []
    response = client.post("/v1/tasks", json={"config": SMALL}, headers={"Authorization": f"bearer {OTHER}"})
    assert response.status_code == 201
    assert response.json()["submitter"] == "coordinator"


def test_auth_comes_before_body_parsing(client: TestClient, api_store: Store) -> None:
    # Without a token, a malformed body is not even looked at: 401, not 422.
    response = client.post("/v1/tasks", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401
    assert stored_tasks(api_store) == []


def test_schema_and_docs_are_public(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


# --------------------------------------------------------------------------- rate limiting


class Ticker:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_rate_limit_answers_429_after_the_burst(api_store: Store) -> None:
    # capacity 2, one token per 2 s: two requests pass, the third waits 2 s; half a
    # second later 1.5 s remain (Retry-After rounds up to 2); after 2 s one passes.
    ticker = Ticker()
    client = make_client(api_store, rate=RateSpec(capacity=2, refill_per_s=0.5), rate_clock=ticker)
    assert [client.get("/v1/pools", headers=AUTH).status_code for _ in range(2)] == [200, 200]
    refused = client.get("/v1/pools", headers=AUTH)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "2"
    assert refused.json() == {"detail": "rate limit exceeded; retry in 2 s", "error": "RateLimited"}
    ticker.t = 0.5
    assert client.get("/v1/pools", headers=AUTH).headers["Retry-After"] == "2"
    ticker.t = 2.0
    assert client.get("/v1/pools", headers=AUTH).status_code == 200
    assert client.get("/v1/pools", headers=AUTH).status_code == 429


def test_rate_limit_keys_by_token_and_by_address_for_the_unauthenticated(api_store: Store) -> None:
    ticker = Ticker()
    client = make_client(api_store, rate=RateSpec(capacity=1, refill_per_s=1), rate_clock=ticker)
    assert client.get("/v1/pools", headers=AUTH).status_code == 200
    assert client.get("/v1/pools", headers=AUTH).status_code == 429
    # Another token has its own bucket.
    assert client.get("/v1/pools", headers={"Authorization": f"Bearer {OTHER}"}).status_code == 200
    # Guessing tokens is throttled by client address: one 401, then 429.
    assert client.get("/v1/pools", headers={"Authorization": "Bearer guess-1"}).status_code == 401
    assert client.get("/v1/pools", headers={"Authorization": "Bearer guess-2"}).status_code == 429
    assert client.get("/v1/health").status_code == 429  # the same address


def test_no_rate_means_no_limit(client: TestClient) -> None:
    assert {client.get("/v1/pools", headers=AUTH).status_code for _ in range(50)} == {200}


# --------------------------------------------------------------------------- submitting tasks


def test_submit_a_valid_task(client: TestClient, api_store: Store, clock: FakeClock) -> None:
    body = {"kind": "train", "config": SMALL, "priority": 5, "weight": 2, "max_attempts": 2, "timeout_s": 60}
    response = client.post("/v1/tasks", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["id"] == 1
    assert (task["kind"], task["state"], task["submitter"]) == ("train", "queued", "ci")
    assert (task["priority"], task["weight"], task["max_attempts"], task["timeout_s"]) == (5, 2.0, 2, 60.0)
    assert task["min_sites"] == 2  # the config's own minimum: every site
    assert task["segmentation"] is None
    assert [s["name"] for s in task["config"]["sites"]] == ["a", "b"]
    stored = api_store.queue.get(task_id=1)
    assert stored.config_json == parse_config(data=SMALL).to_json()
    assert stored.submitted_at == clock.now
    assert client.get("/v1/tasks/1", headers=AUTH).json() == task


def test_submit_stores_the_segmentation_spec(client: TestClient, api_store: Store) -> None:
    segmentation = {"mode": "block", "block": {"block_count": 4, "replication": 2}}
    response = client.post("/v1/tasks", json={"config": SMALL | {"segmentation": segmentation}}, headers=AUTH)
    assert response.status_code == 201, response.text
    stored = api_store.queue.get(task_id=response.json()["id"])
    assert stored.segmentation_json is not None
    assert json.loads(stored.segmentation_json)["block"] == {"block_size": None, "block_count": 4, "replication": 2}
    assert response.json()["segmentation"]["mode"] == "block"


def test_unknown_config_field_is_422_naming_it(client: TestClient, api_store: Store, ids: dict[str, int]) -> None:
    before = stored_tasks(api_store)
    response = client.post("/v1/tasks", json={"config": SMALL | {"roundz": 5}}, headers=AUTH)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "config"]
    assert error["type"] == "ConfigError"
    assert "roundz: unknown key" in error["msg"]
    assert stored_tasks(api_store) == before  # nothing already stored is lost or added


def test_invalid_config_value_is_422_naming_the_field(client: TestClient, api_store: Store) -> None:
    response = client.post("/v1/tasks", json={"config": SMALL | {"rounds": 0}}, headers=AUTH)
    assert response.status_code == 422
    assert "rounds = 0" in detail_text(response)
    assert stored_tasks(api_store) == []


def test_segmentation_that_does_not_fit_is_422_naming_replication(
    client: TestClient, api_store: Store, ids: dict[str, int]
) -> None:
    before = stored_tasks(api_store)
    response = client.post("/v1/tasks", json={"config": SMALL | {"segmentation": BAD_SEGMENTATION}}, headers=AUTH)
    assert response.status_code == 422
    message = detail_text(response)
    assert "block.replication = 3 is more than the 2 site(s)" in message
    assert stored_tasks(api_store) == before


def test_malformed_segmentation_spec_is_422(client: TestClient, api_store: Store) -> None:
    segmentation = {"mode": "block", "block": {"block_count": 4, "block_size": 8}}
    response = client.post("/v1/tasks", json={"config": SMALL | {"segmentation": segmentation}}, headers=AUTH)
    assert response.status_code == 422
    assert "exactly one of block_size or block_count" in detail_text(response)
    assert stored_tasks(api_store) == []


def test_unknown_strategy_is_422(client: TestClient, api_store: Store) -> None:
    response = client.post("/v1/tasks", json={"config": SMALL | {"strategy": {"name": "fedsgd"}}}, headers=AUTH)
    assert response.status_code == 422
    assert "unknown strategy 'fedsgd'" in detail_text(response)


def test_import_path_strategies_are_refused_over_the_api(client: TestClient, api_store: Store) -> None:
    config = SMALL | {"strategy": {"name": "os.path:join"}}
    response = client.post("/v1/tasks", json={"config": config}, headers=AUTH)
    assert response.status_code == 422
    assert "import-path strategies are not accepted" in detail_text(response)
    # Allowed explicitly, the strategy is resolved (and here rejected as not a strategy class).
    allowing = make_client(api_store, validate_task=task_validator(allow_strategy_imports=True))
    response = allowing.post("/v1/tasks", json={"config": config}, headers=AUTH)
    assert response.status_code == 422
    assert "must be a class that subclasses" in detail_text(response)
    assert stored_tasks(api_store) == []


def test_a_model_too_large_to_check_is_refused_before_it_is_built(client: TestClient, api_store: Store) -> None:
    config = SMALL | {"model": {"name": "mlp", "hidden": [4096] * 4}, "segmentation": BAD_SEGMENTATION}
    response = client.post("/v1/tasks", json={"config": config}, headers=AUTH)
    assert response.status_code == 422
    assert "asks for 50331648 weights between hidden layers" in detail_text(response)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"config": SMALL, "surprise": 1}, "surprise"),
        ({"config": SMALL, "kind": "predict"}, "kind"),
        ({"config": SMALL, "weight": 0}, "weight"),
        ({"config": SMALL, "weight": -1.5}, "weight"),
        ({"config": SMALL, "priority": "5"}, "priority"),
        ({"config": SMALL, "priority": 10**30}, "priority"),
        ({"config": SMALL, "max_attempts": 0}, "max_attempts"),
        ({"config": SMALL, "timeout_s": 0}, "timeout_s"),
        ({"config": SMALL, "min_sites": 0}, "min_sites"),
        ({"config": SMALL, "pools_needed": "cpu"}, "pools_needed"),
        ({"config": "sites = []"}, "config"),
        ({}, "config"),
    ],
)
def test_request_validation_is_422_naming_the_field(
    fast_client: TestClient, api_store: Store, body: dict[str, Any], field: str
) -> None:
    response = fast_client.post("/v1/tasks", json=body, headers=AUTH)
    assert response.status_code == 422
    assert any(field in error["loc"] for error in response.json()["detail"]), response.json()
    assert stored_tasks(api_store) == []


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b"\xff\xfe", b'{"config": {"sites": [{"name": "a"}]}, }'])
def test_malformed_json_is_422(fast_client: TestClient, api_store: Store, raw: bytes) -> None:
    response = fast_client.post("/v1/tasks", content=raw, headers=AUTH | {"Content-Type": "application/json"})
    assert response.status_code == 422
    assert stored_tasks(api_store) == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"config": {"sites": [{"name": "a"}]}, "weight": NaN}',
        b'{"config": {"sites": [{"name": "a"}]}, "priority": 1e400}',
        b'{"config": {"sites": [{"name": "a"}]}, "timeout_s": -Infinity}',
        b'{"config": {"sites": [{"name": "a"}], "learning_rate": NaN}}',
    ],
)
def test_non_finite_numbers_are_422_not_a_crash(fast_client: TestClient, api_store: Store, raw: bytes) -> None:
    # Python's JSON parser reads NaN, Infinity and 1e400; FastAPI's own 422 handler then
    # fails to echo them back (a 500). Ours shows them as text.
    response = fast_client.post("/v1/tasks", content=raw, headers=AUTH | {"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert stored_tasks(api_store) == []


def test_a_body_not_sent_as_json_is_422_with_its_text(fast_client: TestClient, api_store: Store) -> None:
    response = fast_client.post("/v1/tasks", content=b'{"config": {}}', headers=AUTH | {"Content-Type": "text/plain"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert (error["loc"], error["input"]) == (["body"], '{"config": {}}')
    assert stored_tasks(api_store) == []


def test_json_nested_too_deeply_is_400(fast_client: TestClient, api_store: Store) -> None:
    raw = b'{"config": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = fast_client.post("/v1/tasks", content=raw, headers=AUTH | {"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"detail": "There was an error parsing the body", "error": "BadRequest"}


def test_unknown_routes_and_methods_keep_the_error_shape(fast_client: TestClient) -> None:
    missing = fast_client.get("/v1/nothing-here", headers=AUTH)
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found", "error": "NotFound"})
    wrong = fast_client.delete("/v1/tasks", headers=AUTH)
    assert (wrong.status_code, wrong.json()["error"]) == (405, "MethodNotAllowed")
    assert "Allow" in wrong.headers  # kept from Starlette's answer


def test_unknown_pool_is_422(fast_client: TestClient, api_store: Store, ids: dict[str, int]) -> None:
    before = stored_tasks(api_store)
    response = fast_client.post("/v1/tasks", json={"config": SMALL, "pools_needed": ["tpu"]}, headers=AUTH)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "pools_needed"]
    assert "unknown pool(s) 'tpu'; known pools: cpu, gpu" in error["msg"]
    assert stored_tasks(api_store) == before


def test_body_over_the_limit_is_413(api_store: Store) -> None:
    client = make_client(api_store, validate_task=fast_validator, max_body_bytes=100)
    response = client.post("/v1/tasks", json={"config": SMALL | {"name": "x" * 200}}, headers=AUTH)
    assert response.status_code == 413
    assert response.json()["error"] == "PayloadTooLarge"
    assert stored_tasks(api_store) == []

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"config": '
        yield json.dumps(SMALL | {"name": "y" * 200}).encode()
        yield b"}"

    response = client.post("/v1/tasks", content=chunks(), headers=AUTH | {"Content-Type": "application/json"})
    assert response.status_code == 413


# --------------------------------------------------------------------------- tasks and the exception queue


def test_list_tasks_by_state(fast_client: TestClient, ids: dict[str, int]) -> None:
    every = fast_client.get("/v1/tasks", headers=AUTH).json()
    assert [t["id"] for t in every] == sorted(ids.values())
    dead = fast_client.get("/v1/tasks", params={"state": "dead_lettered"}, headers=AUTH).json()
    assert [t["id"] for t in dead] == [ids["dead"]]
    response = fast_client.get("/v1/tasks", params={"state": "lost"}, headers=AUTH)
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/tasks/999"),
        ("GET", "/v1/tasks/999/failures"),
        ("POST", "/v1/tasks/999/cancel"),
        ("POST", "/v1/tasks/999/replay"),
    ],
)
def test_unknown_task_id_is_404_with_a_reason(
    fast_client: TestClient, api_store: Store, ids: dict[str, int], method: str, path: str
) -> None:
    before = stored_tasks(api_store)
    response = fast_client.request(method, path, headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"detail": "unknown task id 999", "error": "UnknownTaskError"}
    assert stored_tasks(api_store) == before


@pytest.mark.parametrize("path", ["/v1/tasks/abc", "/v1/tasks/0", "/v1/tasks/-1", f"/v1/tasks/{2**63}"])
def test_malformed_task_id_is_422(fast_client: TestClient, path: str) -> None:
    assert fast_client.get(path, headers=AUTH).status_code == 422


def test_cancel_then_cancel_again_is_409(fast_client: TestClient, api_store: Store, ids: dict[str, int]) -> None:
    task_id = ids["queued"]
    response = fast_client.post(f"/v1/tasks/{task_id}/cancel", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    again = fast_client.post(f"/v1/tasks/{task_id}/cancel", headers=AUTH)
    assert again.status_code == 409
    assert again.json()["error"] == "IllegalTransitionError"
    assert "cannot cancel task" in again.json()["detail"]
    assert "'cancelled'" in again.json()["detail"]
    assert api_store.queue.get(task_id=task_id).state == "cancelled"


def test_dead_letters_show_their_history_and_replay_requeues(
    fast_client: TestClient, api_store: Store, ids: dict[str, int]
) -> None:
    dead = fast_client.get("/v1/tasks/dead", headers=AUTH).json()
    assert len(dead) == 1
    (letter,) = dead
    assert letter["id"] == ids["dead"]
    assert (letter["attempts"], letter["max_attempts"]) == (1, 1)
    assert (letter["exc_type"], letter["message"], letter["log_tail"]) == (
        "RuntimeError",
        "site a crashed",
        "...\nboom",
    )
    assert [f["exc_type"] for f in letter["failures"]] == ["RuntimeError"]

    replayed = fast_client.post(f"/v1/tasks/{ids['dead']}/replay", headers=AUTH)
    assert replayed.status_code == 200
    assert (replayed.json()["state"], replayed.json()["attempts"]) == ("queued", 0)
    assert fast_client.get("/v1/tasks/dead", headers=AUTH).json() == []
    # The history survives the replay.
    failures = fast_client.get(f"/v1/tasks/{ids['dead']}/failures", headers=AUTH).json()
    assert [(f["attempt"], f["message"]) for f in failures] == [(1, "site a crashed")]
    # A queued task is not in the exception queue: replaying it again is a conflict.
    again = fast_client.post(f"/v1/tasks/{ids['dead']}/replay", headers=AUTH)
    assert again.status_code == 409


def test_a_task_failed_past_its_attempts_through_the_store_is_dead_lettered(
    fast_client: TestClient, api_store: Store
) -> None:
    task_id = fast_client.post("/v1/tasks", json={"config": SMALL, "max_attempts": 2}, headers=AUTH).json()["id"]
    for attempt in (1, 2):
        api_store.queue.mark_running(task_id=task_id, now=api_store.queue.get(task_id=task_id).not_before)
        api_store.queue.mark_failed(task_id=task_id, exc_type="OSError", message=f"attempt {attempt}")
    dead = fast_client.get("/v1/tasks/dead", headers=AUTH).json()
    assert [(d["id"], d["message"], len(d["failures"])) for d in dead] == [(task_id, "attempt 2", 2)]
    assert fast_client.post(f"/v1/tasks/{task_id}/replay", headers=AUTH).json()["state"] == "queued"


# --------------------------------------------------------------------------- sites and pools


def test_sites_with_health_and_pools(fast_client: TestClient, ids: dict[str, int], clock: FakeClock) -> None:
    sites = fast_client.get("/v1/sites", headers=AUTH).json()
    assert [(s["name"], s["pool"], s["health"]) for s in sites] == [("a", "gpu", "online"), ("b", "cpu", "suspect")]
    clock.advance(3600)  # health is computed at the request: silence makes both offline
    assert {s["health"] for s in fast_client.get("/v1/sites", headers=AUTH).json()} == {"offline"}
    gpu = fast_client.get("/v1/sites", params={"pool": "gpu"}, headers=AUTH).json()
    assert [s["name"] for s in gpu] == ["a"]
    unknown = fast_client.get("/v1/sites", params={"pool": "tpu"}, headers=AUTH)
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "UnknownPoolError"
    pools = fast_client.get("/v1/pools", headers=AUTH).json()
    assert [(p["name"], p["device"], p["capacity"], p["sites"]) for p in pools] == [
        ("cpu", "cpu", 4, 1),
        ("gpu", "cuda", 2, 1),
    ]


# --------------------------------------------------------------------------- models


def test_model_versions_list_get_and_export_with_matching_hash(
    fast_client: TestClient, api_store: Store, ids: dict[str, int], tmp_path: Path
) -> None:
    task = str(ids["queued"])
    versions = fast_client.get("/v1/models", params={"task_id": task}, headers=AUTH).json()
    assert [(v["round"], v["parent_id"]) for v in versions] == [(1, None), (2, versions[0]["id"])]
    latest = versions[-1]
    assert fast_client.get(f"/v1/models/{latest['id']}", headers=AUTH).json() == latest
    assert fast_client.get("/v1/models", params={"task_id": "nothing"}, headers=AUTH).json() == []

    response = fast_client.get(f"/v1/models/{latest['id']}/export", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["X-Content-Hash"] == latest["content_hash"]
    assert response.headers["X-File-SHA256"] == hashlib.sha256(response.content).hexdigest()
    file = tmp_path / "downloaded.safetensors"
    file.write_bytes(response.content)
    exported = read_export(path=file)  # verifies the content against its hash
    assert exported.content_hash == latest["content_hash"]
    assert (exported.version_id, exported.round, exported.task_id) == (latest["id"], 2, task)
    assert isinstance(exported.content, dict)
    np.testing.assert_array_equal(exported.content["w"], weights(2)["w"])


def test_unknown_model_version_is_404(fast_client: TestClient, ids: dict[str, int]) -> None:
    for path in ("/v1/models/999", "/v1/models/999/export"):
        response = fast_client.get(path, headers=AUTH)
        assert response.status_code == 404
        assert response.json() == {"detail": "unknown model version 999", "error": "UnknownVersionError"}


def test_export_of_corrupted_content_is_409(fast_client: TestClient, api_store: Store, ids: dict[str, int]) -> None:
    from safetensors.numpy import save

    version = api_store.models.versions(task_id=ids["queued"])[0]
    with api_store.engine.begin() as conn:
        conn.execute(
            text("UPDATE model_blobs SET data = :d WHERE content_hash = :h"),
            {"d": save(weights(99)), "h": version.content_hash},
        )
    response = fast_client.get(f"/v1/models/{version.id}/export", headers=AUTH)
    assert response.status_code == 409
    assert response.json()["error"] == "ContentHashMismatchError"
    assert f"model version {version.id}" in response.json()["detail"]


def test_rollback_adds_a_version_and_refuses_a_foreign_one(
    fast_client: TestClient, api_store: Store, ids: dict[str, int]
) -> None:
    task = str(ids["queued"])
    first, second = api_store.models.versions(task_id=task)
    response = fast_client.post(f"/v1/models/{task}/rollback", json={"version_id": first.id}, headers=AUTH)
    assert response.status_code == 201
    rolled = response.json()
    assert (rolled["rolled_back_from"], rolled["parent_id"], rolled["content_hash"]) == (
        first.id,
        second.id,
        first.content_hash,
    )
    assert len(api_store.models.versions(task_id=task)) == 3
    foreign = fast_client.post("/v1/models/other/1/rollback", json={"version_id": first.id}, headers=AUTH)
    assert foreign.status_code == 404  # a task key with a slash ("<name>/<run id>") routes too
    assert "belongs to task" in foreign.json()["detail"]
    missing = fast_client.post(f"/v1/models/{task}/rollback", json={"version_id": 999}, headers=AUTH)
    assert missing.status_code == 404
    bad = fast_client.post(f"/v1/models/{task}/rollback", json={"version_id": "1"}, headers=AUTH)
    assert bad.status_code == 422
    assert len(api_store.models.versions(task_id=task)) == 3


# --------------------------------------------------------------------------- events


def test_events_filter_by_kind_task_time_and_limit(
    fast_client: TestClient, ids: dict[str, int], clock: FakeClock
) -> None:
    rounds = fast_client.get("/v1/events", params={"kind": "round"}, headers=AUTH).json()
    assert [(e["task_id"], e["payload"].get("round")) for e in rounds] == [
        (str(ids["queued"]), 2),
        (str(ids["queued"]), 3),
        (str(ids["dead"]), 1),
    ]
    mine = fast_client.get("/v1/events", params={"kind": "round", "task_id": ids["dead"]}, headers=AUTH).json()
    assert len(mine) == 1
    assert len(fast_client.get("/v1/events", params={"limit": 2}, headers=AUTH).json()) == 2
    later = (clock.now + timedelta(seconds=1)).isoformat()
    assert fast_client.get("/v1/events", params={"since": later}, headers=AUTH).json() == []
    for params in (
        {"kind": "gossip"},
        {"limit": 0},
        {"limit": 5000},
        {"since": "2025-01-01T00:00:00"},  # naive: which time zone?
        {"since": "9999-12-31T23:59:59-01:00"},  # past datetime.max in UTC
        {"since": "0001-01-01T00:00:00+01:00"},  # before datetime.min in UTC
    ):
        assert fast_client.get("/v1/events", params=params, headers=AUTH).status_code == 422, params


# --------------------------------------------------------------------------- metrics


def metric_lines(body: str) -> set[str]:
    return {line for line in body.splitlines() if line and not line.startswith("#")}


def test_metrics_expose_queue_sites_and_the_latest_round(fast_client: TestClient, ids: dict[str, int]) -> None:
    response = fast_client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = metric_lines(response.text)
    t, d = ids["queued"], ids["dead"]
    expected = {
        'dmsc_fed_tasks{state="queued"} 1.0',
        'dmsc_fed_tasks{state="running"} 0.0',
        'dmsc_fed_tasks{state="succeeded"} 1.0',
        'dmsc_fed_tasks{state="failed"} 1.0',
        'dmsc_fed_tasks{state="dead_lettered"} 1.0',
        'dmsc_fed_tasks{state="cancelled"} 1.0',
        'dmsc_fed_sites{health="online"} 1.0',
        'dmsc_fed_sites{health="suspect"} 1.0',
        'dmsc_fed_sites{health="offline"} 0.0',
        f'dmsc_fed_round{{task="{t}"}} 3.0',  # the newest round event, not the older one
        f'dmsc_fed_round_seconds{{task="{t}"}} 1.5',
        f'dmsc_fed_round_participants{{task="{t}"}} 2.0',
        f'dmsc_fed_round_bytes{{direction="up",task="{t}"}} 2048.0',
        f'dmsc_fed_round_bytes{{direction="down",task="{t}"}} 4096.0',
        f'dmsc_fed_round_accuracy{{task="{t}"}} 0.75',
        f'dmsc_fed_round_loss{{task="{t}"}} 0.5',
        f'dmsc_fed_epsilon{{site="a",task="{t}"}} 0.25',
        f'dmsc_fed_epsilon{{site="b",task="{t}"}} 0.5',
        f'dmsc_fed_site_load{{resource="cpu-seconds",site="a",task="{t}"}} 12.5',
        f'dmsc_fed_site_load{{resource="max-rss-mb",site="a",task="{t}"}} 300.0',
        f'dmsc_fed_round{{task="{d}"}} 1.0',
        f'dmsc_fed_round_seconds{{task="{d}"}} 0.5',
    }
    assert expected <= lines, sorted(expected - lines)
    # Fields the dead task's event did not carry are left out, not zero.
    assert not any(f'task="{d}"' in line for line in lines if line.startswith("dmsc_fed_epsilon"))


def test_metrics_follow_the_store_on_every_scrape(fast_client: TestClient, api_store: Store) -> None:
    assert 'dmsc_fed_tasks{state="queued"} 0.0' in metric_lines(fast_client.get("/metrics", headers=AUTH).text)
    fast_client.post("/v1/tasks", json={"config": SMALL}, headers=AUTH)
    api_store.events.log_event(kind="round", task_id="t/9", round=1, participants=3, epsilon={"x": 1.0})
    lines = metric_lines(fast_client.get("/metrics", headers=AUTH).text)
    assert 'dmsc_fed_tasks{state="queued"} 1.0' in lines
    assert 'dmsc_fed_round_participants{task="t/9"} 3.0' in lines
    assert 'dmsc_fed_epsilon{site="x",task="t/9"} 1.0' in lines
    assert any(
        line.startswith('dmsc_fed_api_requests_total{method="POST",route="/v1/tasks",status="201"}') for line in lines
    )


def test_malformed_round_payloads_are_skipped_not_fatal(fast_client: TestClient, api_store: Store) -> None:
    api_store.events.log_event(
        kind="round", task_id="odd", round="three", seconds=True, participants=10**400, epsilon=[1, 2], bytes_up=-1
    )
    response = fast_client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    odd = {line for line in metric_lines(response.text) if 'task="odd"' in line}
    assert odd == {'dmsc_fed_round_bytes{direction="up",task="odd"} -1.0'}


def test_metrics_can_be_public(api_store: Store) -> None:
    client = make_client(api_store, metrics_public=True)
    assert client.get("/metrics").status_code == 200
    assert client.get("/v1/tasks").status_code == 401


# --------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (UnknownTaskError("x"), 404),
        (UnknownSiteError("x"), 404),
        (UnknownPoolError("x"), 404),
        (UnknownVersionError("x"), 404),
        (IllegalTransitionError("x"), 409),
        (SiteKeyMismatchError("x"), 409),
        (ContentHashMismatchError("x"), 409),
        (StoreUnreachableError("x"), 503),
        (SchemaTooNewError("x"), 503),
        (MigrationError("x"), 503),
        (StoreError("x"), 503),
        (ConfigError("x"), 422),
        (ModelError("x"), 422),
        (DmscError("x"), 422),
    ],
)
def test_status_for_every_error(error: DmscError, status: int) -> None:
    assert status_for(error=error) == status


def test_an_unreachable_store_is_503_not_a_4xx(
    fast_client: TestClient, api_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(**_: Any) -> None:
        raise StoreError("store sqlite:///x: disk I/O error")

    monkeypatch.setattr(api_store.queue, "counts_by_state", down)
    monkeypatch.setattr(api_store.queue, "tasks", down)
    for path in ("/v1/health", "/v1/tasks", "/metrics"):
        response = fast_client.get(path, headers=AUTH)
        assert response.status_code == 503, path
        assert response.headers["Retry-After"] == "5"


def test_a_validator_that_raises_value_error_still_gives_422(api_store: Store) -> None:
    def sloppy(config: dict[str, Any]) -> FederationConfig:
        raise ValueError("sloppy check")

    client = make_client(api_store, validate_task=sloppy)
    response = client.post("/v1/tasks", json={"config": SMALL}, headers=AUTH)
    assert response.status_code == 422
    assert detail_text(response) == "sloppy check"


def test_a_bug_is_a_logged_500(api_store: Store, caplog: pytest.LogCaptureFixture) -> None:
    def broken(config: dict[str, Any]) -> FederationConfig:
        raise RuntimeError("a genuine bug")

    client = TestClient(
        create_app(store=api_store, tokens=TokenSet.from_secrets(secrets={"ci": TOKEN}), validate_task=broken),
        raise_server_exceptions=False,
    )
    with caplog.at_level(logging.ERROR, logger="dmsc_fed.control.api"):
        response = client.post("/v1/tasks", json={"config": SMALL}, headers=AUTH)
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; it was logged", "error": "InternalError"}
    assert "a bug in the control API" in caplog.text
    assert "a genuine bug" in caplog.text


# --------------------------------------------------------------------------- OpenAPI schema


def test_openapi_schema_is_precise(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {
        "/v1/health",
        "/v1/tasks",
        "/v1/tasks/dead",
        "/v1/tasks/{task_id}",
        "/v1/tasks/{task_id}/failures",
        "/v1/tasks/{task_id}/cancel",
        "/v1/tasks/{task_id}/replay",
        "/v1/sites",
        "/v1/pools",
        "/v1/models",
        "/v1/models/{version_id}",
        "/v1/models/{version_id}/export",
        "/v1/models/{task_id}/rollback",
        "/v1/events",
        "/metrics",
    }
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in paths["/v1/health"]["get"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            if path != "/v1/health":
                assert operation["security"] == [{"HTTPBearer": []}], (method, path)
                assert {"401", "429"} <= set(operation["responses"]), (method, path)
    submission = schema["components"]["schemas"]["TaskSubmission"]
    assert submission["additionalProperties"] is False
    assert submission["properties"]["config"]["allOf"] == [{"$ref": "#/components/schemas/FederationConfig"}]
    config = schema["components"]["schemas"]["FederationConfig"]
    assert config["additionalProperties"] is False
    assert "segmentation" in config["properties"]
    assert "SegmentationSpec" in schema["components"]["schemas"]
    assert set(paths["/v1/tasks/{task_id}/cancel"]["post"]["responses"]) >= {"200", "404", "409", "422"}


# --------------------------------------------------------------------------- store additions the API needs


def test_counts_by_state_has_every_state(api_store: Store, ids: dict[str, int]) -> None:
    assert api_store.queue.counts_by_state() == {
        "queued": 1,
        "running": 0,
        "succeeded": 1,
        "failed": 1,
        "dead_lettered": 1,
        "cancelled": 1,
    }


def test_counts_by_state_of_an_empty_queue(api_store: Store) -> None:
    assert set(api_store.queue.counts_by_state().values()) == {0}


def test_latest_per_task_is_the_newest_event_of_each_task(api_store: Store) -> None:
    log = api_store.events
    first = log.log_event(kind="round", task_id="a", round=1)
    log.log_event(kind="round", round=9)  # no task: left out
    log.log_event(kind="fault", task_id="a", action="x")  # another kind: left out
    b = log.log_event(kind="round", task_id="b", round=1)
    a2 = log.log_event(kind="round", task_id="a", round=2)
    assert log.latest_per_task(kind="round") == {"a": a2, "b": b}
    assert first != a2
    assert log.latest_per_task(kind="privacy") == {}
    with pytest.raises(ValueError, match="unknown event kind"):
        log.latest_per_task(kind="gossip")  # type: ignore[arg-type]
