"""Shared fixtures: a real PostgreSQL server on loopback for the case-store tests."""

import os

# Tests never reach the Hugging Face hub: `datasets` and `huggingface_hub` read these at import,
# so a hub id that slipped into a test fails at once instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.pg_server import postgres_url  # noqa: F401
