"""One exception hierarchy for dmsc-fed.

Every error a user can cause derives from :class:`DmscError`. The CLI maps each
class to a stable exit code and prints its message without a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class DmscError(Exception):
    """Base class of all dmsc-fed errors a user can act on."""

    exit_code: int = 1


class ConfigError(DmscError):
    """A configuration file or value is invalid."""

    exit_code = 2


class DataError(DmscError):
    """A site's data is missing, malformed or inconsistent with the config."""

    exit_code = 3


class ModelError(DmscError):
    """A model name is unknown or parameters do not fit the model."""

    exit_code = 4


class PrivacyError(DmscError):
    """A privacy step (DP, encryption, keys, policy) cannot be applied: nothing is sent."""

    exit_code = 9


class LauncherError(DmscError):
    """Starting, connecting to or stopping Flower processes failed."""

    exit_code = 5


class PortInUseError(LauncherError):
    """A port the user asked for is already taken."""

    exit_code = 6


class AlreadyRunningError(LauncherError):
    """Another ``dmsc-fed run`` holds the run lock."""

    exit_code = 7


class RunFailedError(DmscError):
    """The federated run ended without completing its rounds."""

    exit_code = 8


class StoreError(DmscError):
    """The control-plane store cannot be reached, migrated or read, or an id in it is unknown.

    Nothing already stored is lost when this is raised: failed writes and failed
    migrations are rolled back.
    """

    exit_code = 10


class Interrupted(DmscError):
    """The user stopped the run (Ctrl-C or SIGTERM)."""

    exit_code = 130


class SnapshotError(DmscError):
    """A round snapshot cannot be written, or none that may be loaded fits the task.

    A snapshot that is truncated or fails its checksum is never loaded; the
    previous good one is used instead.
    """

    exit_code = 11


def invalid_settings(err: ValidationError, source: str) -> str:
    """One line per invalid setting of a pydantic error: the field, the value and why."""
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (value {e['input']!r}); check its spelling")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required but missing")
        else:
            lines.append(f"  {loc} = {e['input']!r}: {msg}")
    return "\n".join(lines)
