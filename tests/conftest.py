"""Shared fixtures: a real PostgreSQL server on loopback for the case-store tests.

Tests never reach a model hub: models are built locally (tests/fakes/tiny_lm.py), and a name
that is not a local folder must fail at once, not after the hub client's connection retries
(about a minute with no network). Set before anything imports huggingface_hub, which reads these
once; subprocesses the tests start (the CLI) inherit them.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import os

# Tests never reach the Hugging Face hub: `datasets` and `huggingface_hub` read these at import,
# so a hub id that slipped into a test fails at once instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.pg_server import postgres_url  # noqa: F401
