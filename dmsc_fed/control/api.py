"""The control API: one authenticated HTTP entry to the control-plane store.

Draft: draft-yang-dmsc-distributed-model-03, section 6.1.2 (API gateway: a single entry
for users with authentication, rate limiting and monitoring) and section 6.2.4 (the
segmentation interface, reachable from the API: a task carries its segmentation spec),
over the store of sections 6.1.3, 6.2.1-6.2.4 and 6.3.8.

Endpoints (all JSON unless said otherwise; every ``/v1`` route but ``/v1/health`` needs
``Authorization: Bearer <token>``, see :mod:`dmsc_fed.control.auth`):

=======================================  ===============================================  =======================
``GET  /v1/health``                      liveness and store reachability (no token)       200, 503
``POST /v1/tasks``                       submit a task with its config and segmentation   201, 400, 413, 422
``GET  /v1/tasks?state=``                list tasks, in submit order                      200, 422
``GET  /v1/tasks/dead``                  dead letters with their failure history          200
``GET  /v1/tasks/{id}``                  one task                                         200, 404, 422
``GET  /v1/tasks/{id}/failures``         a task's failed attempts                         200, 404, 422
``POST /v1/tasks/{id}/cancel``           cancel a task that has not finished              200, 404, 409, 422
``POST /v1/tasks/{id}/replay``           requeue a failed or dead-lettered task           200, 404, 409, 422
``GET  /v1/sites?pool=``                 sites with their computed health                 200, 404, 422
``GET  /v1/pools``                       resource pools                                   200
``GET  /v1/models?task_id=``             a task's model versions, oldest first            200, 422
``GET  /v1/models/{version_id}``         one model version                                200, 404, 422
``GET  /v1/models/{version_id}/export``  the version as a safetensors file (bytes)        200, 404, 409, 422
``POST /v1/models/{task_id}/rollback``   make an earlier version current again            201, 400, 404, 413, 422
``GET  /v1/events?kind=&task_id=&...``   the structured event log                         200, 422
``GET  /metrics``                        Prometheus text exposition                       200, 503
=======================================  ===============================================  =======================

Every protected route may also answer 401 (no or an invalid token; with
``WWW-Authenticate: Bearer``) and 429 (over the rate; with ``Retry-After``). Errors:

* request validation (FastAPI's, and a task config or segmentation spec that does not
  validate or does not fit the model and sites): 422 with FastAPI's ``detail`` list, whose
  ``msg`` is the :class:`~dmsc_fed.errors.ConfigError` message naming the field;
* every other error: ``{"detail": <reason>, "error": <exception class>}``:
  an unknown task, site, pool or model version is 404; an illegal state transition, a
  changed site key and a **content hash mismatch** are 409 (the stored model conflicts
  with its recorded hash: retrying will not help, restore or roll back the version);
  a store that cannot be reached or migrated is 503 (the server's trouble, not the
  caller's, so not a 4xx); a body over ``max_body_bytes`` is 413, one that cannot be
  parsed at all (JSON nested too deeply) 400; FastAPI's own 404 and 405 (no such
  route, wrong method) get the same shape, with the HTTP reason phrase as ``error``;
* anything else is a bug: it is logged with its traceback and answered 500.

A failed request changes nothing in the store: the store rolls back a failed write.

Example::

    from dmsc_fed.control import Store, load_tokens, sqlite_url
    from dmsc_fed.control.api import create_app

    store = Store.open(sqlite_url("control.db"))
    app = create_app(store=store, tokens=load_tokens(path="api-tokens.json"))
    # uvicorn.run(app, host="127.0.0.1", port=8080)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path as FilePath
from typing import Annotated, Any, Final, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from dmsc_fed.config import FederationConfig, parse_config
from dmsc_fed.control.auth import RateLimiter, RateSpec, TokenSet
from dmsc_fed.control.db import Store
from dmsc_fed.control.errors import (
    ContentHashMismatchError,
    IllegalTransitionError,
    SiteKeyMismatchError,
    StoreError,
    UnknownPoolError,
    UnknownSiteError,
    UnknownTaskError,
    UnknownVersionError,
)
from dmsc_fed.control.events import EventKind, EventRecord
from dmsc_fed.control.metrics import CONTENT_TYPE, metrics_registry, render_metrics
from dmsc_fed.control.models import ModelVersionRecord
from dmsc_fed.control.queue import FailureRecord, TaskKind, TaskRecord, TaskState
from dmsc_fed.control.registry import Health, PoolRecord, SiteRecord
from dmsc_fed.errors import DmscError

__all__ = [
    "API_PREFIX",
    "DeadLetterOut",
    "ErrorOut",
    "EventOut",
    "FailureOut",
    "HealthOut",
    "ModelVersionOut",
    "PoolOut",
    "RollbackRequest",
    "SiteOut",
    "TaskOut",
    "TaskSubmission",
    "TaskValidator",
    "create_app",
    "status_for",
    "task_validator",
]

_log = logging.getLogger(__name__)

API_PREFIX: Final = "/v1"
"""Every API route lives under this prefix (``/metrics`` aside, where Prometheus looks)."""

_MAX_ID: Final = 2**63 - 1  # ids are 64-bit signed integers in every database we support
_PUBLIC_PATHS: Final = frozenset({f"{API_PREFIX}/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_PRINCIPAL: Final = "dmsc_fed_principal"
_CONFIG_REF: Final = "#/components/schemas/FederationConfig"

TaskValidator = Callable[[dict[str, Any]], FederationConfig]
"""Turns a submitted config object into a validated config, or raises a :class:`~dmsc_fed.errors.DmscError`."""


# --------------------------------------------------------------------------- request and response models


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


PoolName = Annotated[str, Field(min_length=1, max_length=100)]


class TaskSubmission(_Request):
    """A task to queue (draft 6.2.1), carrying its federation config and segmentation spec (6.2.4).

    ``config`` has the fields of the TOML config file (see the ``FederationConfig``
    schema); its ``segmentation`` section is the segmentation spec. ``min_sites``
    defaults to the config's own minimum (``strategy.min_sites``, else every site).
    """

    kind: TaskKind = "train"
    config: Annotated[
        dict[str, Any],
        WithJsonSchema({"allOf": [{"$ref": _CONFIG_REF}]}),
        Field(description="The federation config, same fields as the TOML file (draft 6.2.4 for segmentation)."),
    ]
    priority: Annotated[int, Field(ge=-1_000_000, le=1_000_000)] = 0
    weight: Annotated[float, Field(gt=0.0, le=1e6, allow_inf_nan=False)] = 1.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    timeout_s: Annotated[float, Field(gt=0.0, le=30 * 86400.0, allow_inf_nan=False)] | None = None
    pools_needed: Annotated[list[PoolName], Field(max_length=64)] = Field(default_factory=list)
    min_sites: Annotated[int, Field(ge=1, le=100_000)] | None = None


class RollbackRequest(_Request):
    """Which earlier version of a task's model to make current again (draft 6.3.7)."""

    version_id: Annotated[int, Field(ge=1, le=_MAX_ID)]


class ErrorOut(_Response):
    """Why a request failed: a reason for people and the error class for programs."""

    detail: str
    error: str


class HealthOut(_Response):
    """The API is up and its store answers."""

    status: Literal["ok"]
    version: str


class TaskOut(_Response):
    """A stored task (draft 6.2.1); ``config`` and ``segmentation`` as JSON objects."""

    id: int
    kind: TaskKind
    state: TaskState
    config: dict[str, Any]
    segmentation: dict[str, Any] | None
    priority: int
    weight: float
    submitter: str
    attempts: int
    max_attempts: int
    timeout_s: float | None
    pools_needed: list[str]
    min_sites: int
    submitted_at: datetime
    started_at: datetime | None
    deadline_at: datetime | None
    finished_at: datetime | None
    not_before: datetime | None


class FailureOut(_Response):
    """One failed or hung attempt (draft 6.2.2)."""

    attempt: int
    exc_type: str
    message: str
    log_tail: str
    hung: bool
    at: datetime


class DeadLetterOut(_Response):
    """A dead-lettered task (draft 6.2.2): its last failure and its whole failure history."""

    id: int
    kind: TaskKind
    submitter: str
    attempts: int
    max_attempts: int
    finished_at: datetime | None
    exc_type: str | None
    message: str | None
    log_tail: str | None
    failures: list[FailureOut]


class SiteOut(_Response):
    """A registered site with its computed health (draft 6.1.3)."""

    name: str
    node_id: int | None
    software_version: str
    pool: str
    device: str
    gpu_memory_mb: int | None
    cpu_cores: int | None
    dataset_size: int | None
    key_fingerprint: str | None
    registered_at: datetime
    last_seen: datetime
    missed_replies: int
    health: Health


class PoolOut(_Response):
    """A resource pool and how many sites it holds (draft 6.3.8)."""

    name: str
    device: str
    capacity: int
    description: str
    sites: int


class ModelVersionOut(_Response):
    """One model version with its lineage (draft 6.2.4)."""

    id: int
    task_id: str
    round: int
    content_hash: str
    format: Literal["safetensors", "bytes"]
    size_bytes: int
    metrics: dict[str, float]
    sites: list[str]
    epsilon: dict[str, float]
    he_params: dict[str, Any] | None
    created_at: datetime
    parent_id: int | None
    rolled_back_from: int | None


class EventOut(_Response):
    """One structured event (draft 6.2.3)."""

    id: int
    ts: datetime
    kind: EventKind
    task_id: str | None
    payload: dict[str, Any]


def _json_object(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else {"value": value}


def _fields(rec: Any) -> dict[str, Any]:
    """A store record's fields (a frozen dataclass), for building its response model."""
    return {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}


def _task_out(rec: TaskRecord) -> TaskOut:
    values = _fields(rec)
    values["config"] = _json_object(values.pop("config_json")) or {}
    values["segmentation"] = _json_object(values.pop("segmentation_json"))
    values["pools_needed"] = list(rec.pools_needed)
    return TaskOut.model_validate(values)


def _failure_out(rec: FailureRecord) -> FailureOut:
    values = _fields(rec)
    values.pop("task_id")
    return FailureOut.model_validate(values)


def _site_out(rec: SiteRecord) -> SiteOut:
    return SiteOut.model_validate(_fields(rec))


def _pool_out(rec: PoolRecord) -> PoolOut:
    return PoolOut.model_validate(_fields(rec))


def _version_out(rec: ModelVersionRecord) -> ModelVersionOut:
    values = _fields(rec)
    values.update(metrics=dict(rec.metrics), sites=list(rec.sites), epsilon=dict(rec.epsilon))
    return ModelVersionOut.model_validate(values)


def _event_out(rec: EventRecord) -> EventOut:
    return EventOut.model_validate(_fields(rec))


# --------------------------------------------------------------------------- validation of submitted tasks


def task_validator(*, allow_strategy_imports: bool = False, max_hidden_weights: int = 10_000_000) -> TaskValidator:
    """The default check of a submitted config: :func:`~dmsc_fed.config.parse_config`, then ``check_task``.

    ``dmsc_fed.cli.check_task(cfg, for_run=True)`` resolves the strategy and fits the
    segmentation spec (draft 6.2.4) to the model and the sites, raising a
    :class:`~dmsc_fed.errors.DmscError` that names what does not fit.

    Parameters
    ----------
    allow_strategy_imports
        Accept a strategy given as an import path ``"package.module:Class"``. Off by
        default: resolving one imports that module on the server (and looks in the
        server's working directory), which a remote caller should not be able to make
        happen. Registered strategy names always work.
    max_hidden_weights
        Most weights between consecutive hidden layers (``sum(h[i] * h[i+1])`` over
        ``model.hidden``) a submitted task may ask for. Checking a segmentation spec
        builds the model on the server, so without a bound one request could ask for
        a model that does not fit in memory.

    Returns
    -------
    TaskValidator
        A callable taking the config object and returning the validated config.

    """

    def validate(config: dict[str, Any]) -> FederationConfig:
        from dmsc_fed.cli import check_task  # lazy: the CLI module imports typer and rich
        from dmsc_fed.errors import ConfigError

        cfg = parse_config(data=config, source="config")
        if ":" in cfg.strategy.name and not allow_strategy_imports:
            raise ConfigError(
                f"strategy.name = {cfg.strategy.name!r}: import-path strategies are not accepted over the API "
                "(the server would import that module); use a registered strategy name, or start the API with "
                "task_validator(allow_strategy_imports=True)"
            )
        hidden = cfg.model.hidden
        weights = sum(a * b for a, b in itertools.pairwise(hidden))
        if weights > max_hidden_weights:
            raise ConfigError(
                f"model.hidden = {hidden if len(hidden) <= 8 else f'[{len(hidden)} layers]'} asks for {weights} "
                f"weights between hidden layers; the API accepts at most {max_hidden_weights}"
            )
        check_task(cfg, for_run=True)
        return cfg

    return validate


def _invalid(*, loc: Iterable[str | int], message: str, kind: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, so every 422 of the API reads the same."""
    return RequestValidationError([{"type": kind, "loc": tuple(loc), "msg": message, "input": None}])


# --------------------------------------------------------------------------- errors


_STATUS: Final[tuple[tuple[type[StoreError], int], ...]] = (
    (UnknownTaskError, 404),
    (UnknownSiteError, 404),
    (UnknownPoolError, 404),
    (UnknownVersionError, 404),
    (IllegalTransitionError, 409),
    (SiteKeyMismatchError, 409),
    (ContentHashMismatchError, 409),
)


def status_for(*, error: DmscError) -> int:
    """The HTTP status of a dmsc-fed error (see the module docstring).

    Unknown ids are 404, conflicts with the stored state (including a content hash
    mismatch) 409, a store that cannot be used 503, any other
    :class:`~dmsc_fed.errors.DmscError` (a user mistake) 422.
    """
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 503 if isinstance(error, StoreError) else 422


def _error(status: int, detail: str, error: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "error": error}, status_code=status, headers=headers)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error answers of a route."""
    text = {
        400: "The body could not be parsed (e.g. JSON nested too deeply).",
        401: "No token, or a token the API does not know.",
        404: "No such task, site, pool or model version.",
        409: "The request conflicts with the stored state.",
        413: "The request body is too large.",
        429: "Over the rate limit; retry after the given seconds.",
        503: "The store cannot be reached.",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"description": text[code], "model": ErrorOut}
        if code == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}}
        if code == 429:
            entry["headers"] = {"Retry-After": {"schema": {"type": "string"}, "required": True}}
        out[code] = entry
    return out


_PROTECTED = (401, 429)


# --------------------------------------------------------------------------- the gateway middleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Gateway:
    """Authentication, rate limiting, body size and request metrics in front of every route (draft 6.1.2).

    It runs before FastAPI parses anything, so a request without a valid token gets 401
    (or 429) whatever its body holds.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tokens: TokenSet,
        limiter: RateLimiter | None,
        public: frozenset[str],
        max_body_bytes: int,
        observe: Callable[..., None],
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.limiter = limiter
        self.public = public
        self.max_body_bytes = max_body_bytes
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if an exception escapes before an answer starts

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._handle(scope, receive, send_and_note)
        finally:
            path = scope.get("path")
            template = getattr(scope.get("route"), "path", None) or (path if path in self.public else "unmatched")
            self.observe(
                method=str(scope.get("method", "")),
                route=str(template),
                status=status,
                seconds=time.perf_counter() - started,
            )

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        presented = headers.get("authorization")
        principal: str | None = None
        if presented is not None:
            scheme, _, secret = presented.partition(" ")
            if scheme.lower() == "bearer" and secret.strip():
                principal = self.tokens.verify(secret=secret.strip())
        if self.limiter is not None:
            client = scope.get("client")
            key = f"token:{principal}" if principal else f"addr:{client[0] if client else 'unknown'}"
            wait = self.limiter.take(key=key)
            if wait > 0:
                retry = str(max(1, math.ceil(wait)))
                await _error(429, f"rate limit exceeded; retry in {retry} s", "RateLimited", {"Retry-After": retry})(
                    scope, receive, send
                )
                return
        if principal is None and scope.get("path") not in self.public:
            reason = "missing bearer token" if presented is None else "invalid bearer token"
            challenge = 'Bearer realm="dmsc-fed"' + ("" if presented is None else ', error="invalid_token"')
            await _error(401, reason, "Unauthorized", {"WWW-Authenticate": challenge})(scope, receive, send)
            return
        scope.setdefault("state", {})[_PRINCIPAL] = principal
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive, send, headers)
            if body is None:
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> bytes | None:
        """The whole body, or None after answering 413 (too large) or on a client that left."""
        limit = self.max_body_bytes
        declared = headers.get("content-length", "")
        too_large = f"request body over {limit} bytes"
        if declared.isdigit() and int(declared) > limit:
            await _error(413, too_large, "PayloadTooLarge")(scope, receive, send)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > limit:
                await _error(413, too_large, "PayloadTooLarge")(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


_bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer <token>` (draft 6.1.2).")


def _principal(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> str:
    """The name of the token the gateway accepted (the security scheme is declared for OpenAPI)."""
    name = request.scope.get("state", {}).get(_PRINCIPAL)
    if not isinstance(name, str):  # only reachable if the gateway is bypassed
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": 'Bearer realm="dmsc-fed"'})
    return name


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59-01:00 is past datetime.max in UTC
        raise ValueError("time is out of range once converted to UTC") from None


UtcTime = Annotated[AwareDatetime, AfterValidator(_in_utc)]
Principal = Annotated[str, Depends(_principal)]
TaskIdPath = Annotated[int, Path(ge=1, le=_MAX_ID, description="A task id.")]
VersionIdPath = Annotated[int, Path(ge=1, le=_MAX_ID, description="A model version id.")]


# --------------------------------------------------------------------------- the app


def create_app(
    *,
    store: Store,
    tokens: TokenSet,
    rate: RateSpec | None = None,
    validate_task: TaskValidator | None = None,
    metrics_public: bool = False,
    max_body_bytes: int = 1 << 20,
    rate_clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The control API over ``store`` (draft 6.1.2, 6.2.4).

    Parameters
    ----------
    store
        An open store; the app does not close it.
    tokens
        The API tokens accepted (:func:`~dmsc_fed.control.auth.load_tokens`).
    rate
        Token-bucket rate per token (and per client address for requests without a
        valid token); None: no limit.
    validate_task
        Turns a submitted config object into a validated config or raises a
        :class:`~dmsc_fed.errors.DmscError` (answered 422); default
        :func:`task_validator` ``()``.
    metrics_public
        Serve ``/metrics`` without a token (for a Prometheus inside a trusted network).
    max_body_bytes
        Largest request body accepted (413 beyond).
    rate_clock
        Monotonic seconds for the rate limiter (tests pass a fake one).

    Returns
    -------
    FastAPI
        The app; serve it with uvicorn. Its OpenAPI schema is at ``/openapi.json``.

    """
    from dmsc_fed import __version__

    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    validator = validate_task if validate_task is not None else task_validator()
    registry, api_metrics = metrics_registry(store=store)
    app = FastAPI(
        title="dmsc-fed control API",
        version=__version__,
        description=(
            "Control plane of a dmsc-fed federation (draft-yang-dmsc-distributed-model-03, 6.1.2 API gateway, "
            "6.2.4 segmentation interface): tasks, the exception queue, sites, pools, model versions, events."
        ),
    )
    public = _PUBLIC_PATHS | ({"/metrics"} if metrics_public else frozenset())
    limiter = RateLimiter(spec=rate, clock=rate_clock) if rate is not None else None
    app.add_middleware(
        _Gateway,
        tokens=tokens,
        limiter=limiter,
        public=public,
        max_body_bytes=max_body_bytes,
        observe=api_metrics.observe,
    )
    _add_error_handlers(app)
    _add_routes(app, store=store, validator=validator, metrics_public=metrics_public, registry=registry)
    _add_openapi(app)
    app.state.store = store
    app.state.limiter = limiter
    return app


def _echo(value: Any) -> Any:
    """A rejected input as it may appear in a 422 body: finite JSON (bytes as text), and short."""
    if isinstance(value, bytes | bytearray):  # a body FastAPI did not decode (not sent as JSON)
        value = bytes(value).decode("utf-8", "replace")
    try:
        text = json.dumps(value, allow_nan=False, default=str)
    except (ValueError, TypeError, RecursionError):  # NaN, Infinity (also 1e400), or nested too deep
        try:
            return repr(value)[:200]
        except RecursionError:
            return "(too deeply nested to show)"
    return json.loads(text) if len(text) <= 1000 else text[:200] + "..."


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's 422 entries, made safe to serialise (its own handler fails on a NaN in the input)."""
    out: list[dict[str, Any]] = []
    for error in exc.errors():
        entry: dict[str, Any] = {
            "type": str(error.get("type", "")),
            "loc": list(error.get("loc", ())),
            "msg": str(error.get("msg", "")),
        }
        if "input" in error:
            entry["input"] = _echo(error["input"])
        ctx = error.get("ctx")
        if isinstance(ctx, dict):
            plain = (int, float, str, type(None))
            entry["ctx"] = {str(k): _echo(v) if isinstance(v, plain) else str(v) for k, v in ctx.items()}
        out.append(entry)
    return out


def _add_error_handlers(app: FastAPI) -> None:
    async def on_invalid_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": _validation_errors(exc)}, status_code=422)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        try:
            phrase = HTTPStatus(exc.status_code).phrase.replace(" ", "")
        except ValueError:
            phrase = "HTTPError"
        return _error(exc.status_code, str(exc.detail), phrase, dict(exc.headers or {}))

    async def on_dmsc_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DmscError)
        status = status_for(error=exc)
        if status == 422:
            entry: dict[str, Any] = {"type": type(exc).__name__, "loc": [], "msg": str(exc), "input": None}
            return JSONResponse({"detail": [entry]}, status_code=422)
        if status >= 500:
            _log.error("%s %s: store unavailable: %s", request.method, request.url.path, exc)
            return _error(status, str(exc), type(exc).__name__, {"Retry-After": "5"})
        return _error(status, str(exc), type(exc).__name__)

    async def on_bug(request: Request, exc: Exception) -> Response:
        _log.error("%s %s failed: a bug in the control API", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error; it was logged", "InternalError")

    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(DmscError, on_dmsc_error)
    app.add_exception_handler(Exception, on_bug)


def _add_routes(
    app: FastAPI,
    *,
    store: Store,
    validator: TaskValidator,
    metrics_public: bool,
    registry: CollectorRegistry,
) -> None:
    v1 = API_PREFIX

    @app.get(f"{v1}/health", tags=["service"], responses=_responses(429, 503))
    def health() -> HealthOut:
        """Liveness: the API answers and its store can be read. No token needed."""
        from dmsc_fed import __version__

        store.queue.counts_by_state()
        return HealthOut(status="ok", version=__version__)

    # ----------------------------------------------------------------- tasks (6.2.1, 6.2.2, 6.2.4)

    @app.post(f"{v1}/tasks", status_code=201, tags=["tasks"], responses=_responses(*_PROTECTED, 400, 413))
    def submit_task(body: TaskSubmission, principal: Principal) -> TaskOut:
        """Queue a task; its config (and segmentation spec) must validate and fit the model and sites."""
        try:
            cfg = validator(dict(body.config))
        except DmscError as exc:
            raise _invalid(loc=("body", "config"), message=str(exc), kind=type(exc).__name__) from None
        except (ValueError, TypeError) as exc:  # a check that forgot to raise a DmscError
            _log.warning("task validation raised %s instead of a DmscError: %s", type(exc).__name__, exc)
            raise _invalid(loc=("body", "config"), message=str(exc), kind=type(exc).__name__) from None
        segmentation = cfg.segmentation.model_dump_json() if cfg.segmentation is not None else None
        try:
            task_id = store.queue.submit(
                kind=body.kind,
                config_json=cfg.to_json(),
                submitter=principal,
                segmentation_json=segmentation,
                priority=body.priority,
                weight=body.weight,
                max_attempts=body.max_attempts,
                timeout_s=body.timeout_s,
                pools_needed=body.pools_needed,
                min_sites=body.min_sites if body.min_sites is not None else cfg.min_sites,
            )
        except UnknownPoolError as exc:
            raise _invalid(loc=("body", "pools_needed"), message=str(exc), kind="UnknownPoolError") from None
        _log.info("task %d (%s) submitted by %s", task_id, body.kind, principal)
        return _task_out(store.queue.get(task_id=task_id))

    @app.get(f"{v1}/tasks", tags=["tasks"], responses=_responses(*_PROTECTED))
    def list_tasks(
        _: Principal, state: Annotated[TaskState | None, Query(description="Only tasks in this state.")] = None
    ) -> list[TaskOut]:
        """Every task (in ``state``, if given), in submit order."""
        return [_task_out(t) for t in store.queue.tasks(state=state)]

    @app.get(f"{v1}/tasks/dead", tags=["tasks"], responses=_responses(*_PROTECTED))
    def dead_letters(_: Principal) -> list[DeadLetterOut]:
        """Dead-lettered tasks with their failure history: exception type, message, log tail (draft 6.2.2)."""
        out = []
        for task in store.queue.dead_letters():
            failures = [_failure_out(f) for f in store.queue.failures(task_id=task.id)]
            last = failures[-1] if failures else None
            out.append(
                DeadLetterOut(
                    id=task.id,
                    kind=task.kind,
                    submitter=task.submitter,
                    attempts=task.attempts,
                    max_attempts=task.max_attempts,
                    finished_at=task.finished_at,
                    exc_type=last.exc_type if last else None,
                    message=last.message if last else None,
                    log_tail=last.log_tail if last else None,
                    failures=failures,
                )
            )
        return out

    @app.get(f"{v1}/tasks/{{task_id}}", tags=["tasks"], responses=_responses(*_PROTECTED, 404))
    def get_task(task_id: TaskIdPath, _: Principal) -> TaskOut:
        """One task."""
        return _task_out(store.queue.get(task_id=task_id))

    @app.get(f"{v1}/tasks/{{task_id}}/failures", tags=["tasks"], responses=_responses(*_PROTECTED, 404))
    def task_failures(task_id: TaskIdPath, _: Principal) -> list[FailureOut]:
        """Every failed attempt of a task, oldest first, kept across replays (draft 6.2.2)."""
        return [_failure_out(f) for f in store.queue.failures(task_id=task_id)]

    @app.post(f"{v1}/tasks/{{task_id}}/cancel", tags=["tasks"], responses=_responses(*_PROTECTED, 404, 409))
    def cancel_task(task_id: TaskIdPath, principal: Principal) -> TaskOut:
        """Cancel a task that has not finished; 409 if it already succeeded or was cancelled."""
        task = store.queue.cancel(task_id=task_id)
        _log.info("task %d cancelled by %s", task_id, principal)
        return _task_out(task)

    @app.post(f"{v1}/tasks/{{task_id}}/replay", tags=["tasks"], responses=_responses(*_PROTECTED, 404, 409))
    def replay_task(task_id: TaskIdPath, principal: Principal) -> TaskOut:
        """Requeue a failed or dead-lettered task with its attempts reset (draft 6.2.2); 409 from other states."""
        task = store.queue.replay(task_id=task_id)
        _log.info("task %d replayed by %s", task_id, principal)
        return _task_out(task)

    # ----------------------------------------------------------------- sites and pools (6.1.3, 6.3.8)

    @app.get(f"{v1}/sites", tags=["sites"], responses=_responses(*_PROTECTED, 404))
    def list_sites(
        _: Principal,
        pool: Annotated[str | None, Query(min_length=1, max_length=100, description="Only sites of this pool.")] = None,
    ) -> list[SiteOut]:
        """Registered sites with their health computed now (draft 6.1.3)."""
        return [_site_out(s) for s in store.registry.sites(pool=pool)]

    @app.get(f"{v1}/pools", tags=["sites"], responses=_responses(*_PROTECTED))
    def list_pools(_: Principal) -> list[PoolOut]:
        """Resource pools and their sizes (draft 6.3.8)."""
        return [_pool_out(p) for p in store.registry.pools()]

    # ----------------------------------------------------------------- models (6.2.4, 6.3.7)

    @app.get(f"{v1}/models", tags=["models"], responses=_responses(*_PROTECTED))
    def list_models(
        _: Principal,
        task_id: Annotated[str, Query(min_length=1, max_length=200, description="The task key of the versions.")],
    ) -> list[ModelVersionOut]:
        """Every model version of a task, oldest first (empty for a task without versions)."""
        return [_version_out(v) for v in store.models.versions(task_id=task_id)]

    @app.get(f"{v1}/models/{{version_id}}", tags=["models"], responses=_responses(*_PROTECTED, 404))
    def get_model(version_id: VersionIdPath, _: Principal) -> ModelVersionOut:
        """One model version with its lineage."""
        return _version_out(store.models.get(version_id=version_id))

    @app.get(
        f"{v1}/models/{{version_id}}/export",
        tags=["models"],
        response_class=Response,
        responses={
            200: {
                "description": (
                    "The version as a safetensors file. ``X-Content-Hash`` is its recorded content hash "
                    "(``dmsc_fed.control.read_export`` verifies it); ``X-File-SHA256`` hashes the bytes sent."
                ),
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                "headers": {
                    "X-Content-Hash": {"schema": {"type": "string"}, "required": True},
                    "X-File-SHA256": {"schema": {"type": "string"}, "required": True},
                },
            },
            **_responses(*_PROTECTED, 404, 409),
        },
    )
    def export_model(version_id: VersionIdPath, principal: Principal) -> Response:
        """Download a model version as a safetensors file; 409 if its content no longer matches its hash."""
        record = store.models.get(version_id=version_id)
        with tempfile.TemporaryDirectory(prefix="dmsc-fed-export-") as tmp:
            data = store.models.export(version_id=version_id, path=FilePath(tmp) / "model.safetensors").read_bytes()
        _log.info("model version %d exported by %s", version_id, principal)
        return Response(
            content=data,
            media_type="application/octet-stream",
            headers={
                "X-Content-Hash": record.content_hash,
                "X-File-SHA256": hashlib.sha256(data).hexdigest(),
                "Content-Disposition": f'attachment; filename="model-v{version_id}.safetensors"',
            },
        )

    @app.post(
        f"{v1}/models/{{task_id:path}}/rollback",
        status_code=201,
        tags=["models"],
        responses=_responses(*_PROTECTED, 400, 404, 413),
    )
    def rollback_model(
        task_id: Annotated[str, Path(min_length=1, max_length=200, description="The task key.")],
        body: RollbackRequest,
        principal: Principal,
    ) -> ModelVersionOut:
        """Make an earlier version of a task current again; a new version records it (draft 6.3.7)."""
        version = store.models.rollback(task_id=task_id, version_id=body.version_id)
        _log.info("task %s rolled back to version %d by %s", task_id, body.version_id, principal)
        return _version_out(version)

    # ----------------------------------------------------------------- events (6.2.3) and metrics (6.1.2)

    @app.get(f"{v1}/events", tags=["events"], responses=_responses(*_PROTECTED))
    def list_events(
        _: Principal,
        kind: Annotated[EventKind | None, Query(description="Only events of this kind.")] = None,
        task_id: Annotated[str | None, Query(min_length=1, max_length=200, description="Only this task's.")] = None,
        since: Annotated[UtcTime | None, Query(description="Only events at or after this time.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="At most this many, oldest first.")] = 100,
    ) -> list[EventOut]:
        """The structured event log (draft 6.2.3), oldest first."""
        return [_event_out(e) for e in store.events.events(kind=kind, task_id=task_id, since=since, limit=limit)]

    metrics_responses = _responses(429, 503) if metrics_public else _responses(*_PROTECTED, 503)

    @app.get(
        "/metrics",
        tags=["service"],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **metrics_responses,
        },
        dependencies=[] if metrics_public else [Depends(_principal)],
    )
    def metrics() -> Response:
        """Queue lengths, site health, round time, participants, bytes and epsilon per task (draft 6.1.2)."""
        return Response(content=render_metrics(registry=registry), media_type=CONTENT_TYPE)


def _add_openapi(app: FastAPI) -> None:
    """Put the federation config's own schema in the OpenAPI document, so ``config`` is precise."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        config_schema = FederationConfig.model_json_schema(ref_template="#/components/schemas/{model}")
        definitions = config_schema.pop("$defs", {})
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in {**definitions, "FederationConfig": config_schema}.items():
            if name in components and components[name] != definition:
                raise RuntimeError(f"OpenAPI schema name clash: {name!r}")  # a programming error, caught by tests
            components[name] = definition
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
