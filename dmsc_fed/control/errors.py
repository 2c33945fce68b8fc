"""Errors of the control-plane store, all subclasses of :class:`dmsc_fed.errors.StoreError`.

The CLI maps every one of them to exit code 10 (inherited from ``StoreError``) and prints
the message without a traceback. Draft section 6.4.2 (database): a failed operation is
rolled back, so raising one of these never loses what was already stored.
"""

from __future__ import annotations

from dmsc_fed.errors import StoreError

__all__ = [
    "ContentHashMismatchError",
    "IllegalTransitionError",
    "MigrationError",
    "SchemaTooNewError",
    "SiteKeyMismatchError",
    "StoreError",
    "StoreUnreachableError",
    "UnknownPoolError",
    "UnknownSiteError",
    "UnknownTaskError",
    "UnknownVersionError",
]


class StoreUnreachableError(StoreError):
    """The database URL is malformed, its driver is missing, or its server cannot be reached."""


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer dmsc-fed than this one; it is left untouched."""


class MigrationError(StoreError):
    """Upgrading the database schema failed; the upgrade was rolled back."""


class UnknownTaskError(StoreError):
    """No task with this id is stored."""


class UnknownSiteError(StoreError):
    """No site with this name (or Flower node id) is registered."""


class UnknownPoolError(StoreError):
    """No resource pool with this name is defined."""


class UnknownVersionError(StoreError):
    """No model version with this id is stored (for this task)."""


class IllegalTransitionError(StoreError):
    """A task cannot move from its current state to the one asked for."""


class SiteKeyMismatchError(StoreError):
    """A site re-registered with a different public key fingerprint than the one stored."""


class ContentHashMismatchError(StoreError):
    """Stored or exported model content does not match its recorded sha256 hash."""
