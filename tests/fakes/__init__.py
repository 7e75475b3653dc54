"""Fakes that speak real wire formats over real loopback HTTP, for what cannot run here (model
servers). ``serve_app`` runs any ASGI app on 127.0.0.1; ``create_fake_openai_app`` is a
vLLM-like chat completions server that records what it received."""

from tests.fakes.loopback import LoopbackServer, LoopbackServers, free_port, serve_app
from tests.fakes.openai_server import (
    FakeOpenAIApp,
    FakeReply,
    RecordedRequest,
    create_fake_openai_app,
)

__all__ = [
    "FakeOpenAIApp",
    "FakeReply",
    "LoopbackServer",
    "LoopbackServers",
    "RecordedRequest",
    "create_fake_openai_app",
    "free_port",
    "serve_app",
]
