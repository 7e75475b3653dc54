"""Shared fixtures: a real PostgreSQL server on loopback, and a case store of each kind (a
SQLite file, a fresh schema on that server) for the case-store tests.

Tests never reach a model hub: models are built locally (tests/fakes/tiny_lm.py), and a name
that is not a local folder must fail at once, not after the hub client's connection retries
(about a minute with no network). Set before anything imports huggingface_hub, which reads these
once; subprocesses the tests start (the CLI) inherit them. `datasets` reads its own at import.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from guardrail.cases import CaseStore, build_store
from guardrail.config import StoreConfig
from tests.pg_server import postgres_url  # noqa: F401


@pytest.fixture
def pg_schema_url(postgres_url: str) -> Iterator[str]:  # noqa: F811 - the fixture
    """The server's URL with a fresh schema first on the search path: tests do not share rows."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cases.db"  # tmp_path is absolute: four slashes
    url: str = request.getfixturevalue("pg_schema_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[CaseStore]:
    opened = build_store(StoreConfig(url=store_url))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.aclose()
