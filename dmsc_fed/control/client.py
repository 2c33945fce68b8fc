"""A small client of the control API, used by the ``dmsc-fed tasks|sites|models`` commands (draft 6.1.2).

Every CLI command that reads or changes the control plane goes through the API (one
entry point with authentication and rate limiting), never to the database directly.
Errors come back as :class:`~dmsc_fed.errors.DmscError` subclasses carrying the API's
reason, so the CLI prints one line and exits with a stable code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dmsc_fed.errors import ConfigError, DmscError, LauncherError, StoreError

DEFAULT_API = "http://127.0.0.1:8470"


def default_token_file() -> Path:
    """``$DMSC_FED_TOKEN_FILE``, else the local coordinator's ``cli-token``."""
    env = os.environ.get("DMSC_FED_TOKEN_FILE")
    if env:
        return Path(env)
    home = Path(os.environ.get("DMSC_FED_HOME", Path.home() / ".dmsc-fed"))
    return home / "coordinator" / "cli-token"


class ApiClient:
    """Calls the control API at ``base_url`` with a bearer token."""

    def __init__(self, *, base_url: str, token: str, timeout_s: float = 30.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s
        )

    @classmethod
    def connect(cls, *, api: str | None, token_file: Path | None) -> ApiClient:
        """A client for ``api`` (default ``$DMSC_FED_API`` or :data:`DEFAULT_API`) with the token in ``token_file``."""
        path = token_file or default_token_file()
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise ConfigError(
                f"cannot read the API token file {path} ({err.strerror}): pass --token-file, or set DMSC_FED_TOKEN_FILE"
            ) from None
        if not token:
            raise ConfigError(f"the API token file {path} is empty")
        if any(c.isspace() or not c.isprintable() for c in token):
            raise ConfigError(f"the API token file {path} must hold one token on one line")
        return cls(base_url=api or os.environ.get("DMSC_FED_API", DEFAULT_API), token=token)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call ``/v1{path}``; the JSON answer, or bytes for binary answers; DmscError on any failure."""
        import httpx

        try:
            res = self._http.request(method, f"/v1{path}", **kwargs)
        except httpx.HTTPError as err:
            raise LauncherError(
                f"cannot reach the control API at {self.base_url}: {err} (is 'dmsc-fed coordinator' running?)"
            ) from None
        if res.status_code >= 400:
            raise _error(res.status_code, _reason(res))
        if res.headers.get("content-type", "").startswith("application/json"):
            return res.json()
        return res.content

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()


def _reason(res: Any) -> str:
    try:
        body = res.json()
    except ValueError:
        return str(res.text)[:500] or res.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI validation errors
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}" for d in detail[:5])
    return str(detail)


def _error(status: int, reason: str) -> DmscError:
    if status == 401:
        return ConfigError(f"the control API refused the token: {reason}")
    if status == 429:
        return LauncherError(f"the control API is rate limiting this client: {reason}")
    if status in (404, 409):
        return StoreError(reason)
    if status in (400, 413, 422):
        return ConfigError(reason)
    return LauncherError(f"the control API failed ({status}): {reason}")
