"""Alembic migrations of the control-plane store (draft 6.4.2).

A regular package so that wheels carry the scripts; :func:`dmsc_fed.control.db.migrate`
runs them programmatically, no ``alembic.ini`` needed. To write a new revision, copy the
newest file in ``versions/`` (``down_revision`` = its ``revision``) and keep the ORM models
in :mod:`dmsc_fed.control.db` in step; ``tests/unit/control/test_db.py`` checks that the
migrated schema and the models agree.
"""
