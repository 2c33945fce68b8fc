"""Schema-driven fuzz of the control API: no request, valid or not, with or without a token, gets a 5xx.

Draft 6.1.2 (API gateway). Schemathesis generates requests from the app's own OpenAPI
schema (positive and negative data) for every operation, against a store seeded with
tasks in every interesting state, sites, pools, model versions and round events.

Checks on every response: never a 5xx, the status code is one the schema documents, the
content type and the body conform to the schema, documented headers (``WWW-Authenticate``
on 401, ``Retry-After`` on 429, the hash headers of an export) are present. Without a
token every protected operation must answer 401, never anything else.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dmsc_fed.control import Store, sqlite_url
from dmsc_fed.control.api import create_app
from dmsc_fed.control.auth import TokenSet

from .conftest import FakeClock
from .test_api import AUTH, TOKEN, seed_store

MAX_EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
PUBLIC = {"/v1/health"}

SEEN: Counter[tuple[str, int]] = Counter()
"""(auth, status) of every fuzzed response; printed at the end of the module (``pytest -s``)."""


# Schemathesis' lazy ``from_fixture`` schemas do not work with pytest 9 (they set
# ``request.node._nodeid``), so the app is built when the module is imported, over a store
# in a temporary directory that is seeded by the module fixture below and removed at exit.
_TMP = tempfile.TemporaryDirectory(prefix="dmsc-fed-fuzz-")
STORE = Store.open(
    sqlite_url(Path(_TMP.name) / "control.db"), clock=FakeClock(datetime(2025, 1, 1, tzinfo=UTC)), seed=0
)
# The real task validator: parse_config, then check_task (strategy, segmentation vs model and sites).
APP = create_app(store=STORE, tokens=TokenSet.from_secrets(secrets={"fuzz": TOKEN}))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def fuzz_store() -> Iterator[Store]:
    seed_store(STORE)
    try:
        yield STORE
    finally:
        STORE.close()
        _TMP.cleanup()
        if SEEN:
            print("\nfuzz statuses (auth, status): count:", dict(sorted(SEEN.items())), "total", sum(SEEN.values()))


def test_seeded_store_is_in_the_expected_shape(fuzz_store: Store) -> None:
    # The fuzz is only as good as the data behind it: every state it should reach exists.
    states = fuzz_store.queue.counts_by_state()
    assert states["queued"] >= 1
    assert states["dead_lettered"] >= 1
    assert fuzz_store.models.versions(task_id="1")
    assert fuzz_store.events.latest_per_task(kind="round")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_server_error_with_a_token(case: Any) -> None:
    response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
    sent = {name.lower() for name in response.request.headers}
    if "authorization" in sent:
        SEEN["token", response.status_code] += 1
        assert response.status_code != 401
    else:  # schemathesis' own "missing Authorization" negative cases drop the header we pass
        SEEN["token dropped", response.status_code] += 1
        assert response.status_code == 401


@schema.parametrize()
@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=[Phase.generate],  # the body does not matter without a token: skip the boundary-value examples
)
def test_without_a_token_every_protected_operation_is_401(case: Any) -> None:
    headers = dict(case.headers or {})
    headers.pop("Authorization", None)
    case.headers = headers
    response = case.call_and_validate(checks=CHECKS)
    SEEN["none", response.status_code] += 1
    if case.operation.path not in PUBLIC:
        assert response.status_code == 401, (case.method, case.formatted_path, response.text)
        assert response.headers["www-authenticate"][0].startswith("Bearer")


@schema.parametrize()
@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=[Phase.generate],  # the body does not matter without a token: skip the boundary-value examples
)
def test_a_wrong_token_is_401_never_5xx(case: Any) -> None:
    response = case.call_and_validate(headers={"Authorization": "Bearer not-a-token"}, checks=CHECKS)
    SEEN["wrong", response.status_code] += 1
    if case.operation.path not in PUBLIC:
        assert response.status_code == 401


OFFSETS = st.integers(min_value=-23 * 60, max_value=23 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@given(
    since=st.one_of(
        st.datetimes(max_value=datetime(1, 1, 2), timezones=OFFSETS),  # near datetime.min
        st.datetimes(min_value=datetime(9999, 12, 30), timezones=OFFSETS),  # near datetime.max
        st.datetimes(timezones=OFFSETS),
    )
)
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_aware_time_filter_is_200_or_422(since: datetime) -> None:
    # Found by hand, missed by the schema fuzz: a time near datetime.min/max with an
    # offset overflowed on conversion to UTC (a 500). The first two strategies aim at those bounds.
    from fastapi.testclient import TestClient

    with TestClient(APP) as client:
        response = client.get("/v1/events", params={"since": since.isoformat()}, headers=AUTH)
    SEEN["since", response.status_code] += 1
    assert response.status_code in (200, 422), response.text
