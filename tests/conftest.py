"""Shared fixtures: a real PostgreSQL server on loopback for the case-store tests."""

from tests.pg_server import postgres_url  # noqa: F401
