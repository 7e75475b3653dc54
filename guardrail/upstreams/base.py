"""The upstream protocol: where the model's text comes from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from guardrail.config import UpstreamConfig
from guardrail.continuation import AssistantPrefix, ChatTemplate, ContinuationForm
from guardrail.events import UpstreamEvent


@dataclass(slots=True)
class ChatRequest:
    """A chat completion request as the upstream should see it.

    ``body`` is the client's JSON body with every field it sent (unknown ones included, so they
    reach the upstream); the upstream decides how to stream it.
    """

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.body.get("messages", [])
        return messages

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None


class Upstream(Protocol):
    """A model server. ``stream`` always streams, whatever the client asked: the proxy guards the
    text as it arrives and assembles a non-streamed answer itself.

    Closing the iterator (``aclose``) must cancel the request upstream: that is how a client
    that leaves, or an unsafe verdict, stops generation.
    """

    name: str
    config: UpstreamConfig

    def stream(self, request: ChatRequest) -> AsyncIterator[UpstreamEvent]: ...

    async def list_models(self) -> list[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ContinuesTurns(Protocol):
    """An upstream that can continue a partial assistant turn, which ``intervene`` needs: the
    forms it accepts (see :mod:`guardrail.continuation`) and the continued stream."""

    continuation_forms: tuple[ContinuationForm, ...]

    def continue_stream(
        self, request: ChatRequest, prefix: AssistantPrefix, form: ContinuationForm, *,
        categories: tuple[str, ...] = (), template: ChatTemplate | None = None,
        url: str | None = None,
    ) -> AsyncIterator[UpstreamEvent]: ...
