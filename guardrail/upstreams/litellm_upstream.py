"""Any provider LiteLLM reaches (``deepseek/deepseek-reasoner``, ``bedrock/...``, or
``openai/<model>`` with ``url`` for any OpenAI-compatible server).

LiteLLM normalises reasoning to ``delta.reasoning_content`` (it renames vLLM's ``reasoning``);
inline ``<think>`` tags still go through our parser. Its exceptions mirror the OpenAI SDK's and
are mapped onto our tree here, at the edge.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx

from guardrail.config import UpstreamConfig
from guardrail.errors import (
    ConfigError,
    GuardrailError,
    UpstreamHTTPError,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from guardrail.events import UpstreamEvent
from guardrail.upstreams.base import ChatRequest
from guardrail.upstreams.chunks import ChunkMapper

# Without this, importing litellm fetches its model price map from GitHub (a network call at
# import, slow or hanging offline). The bundled copy is enough: we never price requests.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# Fields of the client's body that we set ourselves.
_OWN_FIELDS = frozenset({"model", "messages", "stream", "stream_options"})
_UNKNOWN = object()


def _litellm() -> Any:
    """Import litellm on first use: it takes seconds, and only this backend needs it."""
    import litellm

    litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on errors
    return litellm


def _causes(error: BaseException) -> list[BaseException]:
    """The error and what it wraps: LiteLLM nests the real failure several levels deep
    (``MidStreamFallbackError`` -> ``APIConnectionError`` -> ``httpx.ReadTimeout`` -> ...)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 12:
        chain.append(current)
        original = getattr(current, "original_exception", None)
        current = (
            original if isinstance(original, BaseException)
            else current.__cause__ or current.__context__
        )
    return chain


def map_litellm_error(error: Exception, *, started: bool) -> GuardrailError:
    """LiteLLM's exceptions (subclasses of the OpenAI SDK's) to ours, by what they wrap.

    The outer type alone misleads: a refused connection arrives as ``InternalServerError``
    (500), a read timeout mid-stream as ``MidStreamFallbackError`` (503). So the chain is
    searched for a timeout, then for a transport failure; only then is a status taken as the
    upstream's own HTTP answer. ``started``: the response had begun streaming.
    """
    import openai

    message = str(getattr(error, "message", None) or error or type(error).__name__)
    chain = _causes(error)
    for link in chain:
        if isinstance(link, httpx.ConnectTimeout):
            return UpstreamUnavailable(f"upstream unreachable: {message}")
        if isinstance(link, openai.APITimeoutError | httpx.TimeoutException | TimeoutError):
            return UpstreamTimeout(f"upstream did not answer in time: {message}")
    for link in chain:
        if isinstance(link, openai.APIConnectionError | httpx.TransportError | ConnectionError):
            if started:
                return UpstreamStreamBroken(f"upstream stream broke off: {message}")
            return UpstreamUnavailable(f"upstream unreachable: {message}")
    status = getattr(error, "status_code", None)
    if isinstance(status, int) and status >= 400:
        return UpstreamHTTPError(message, status)
    if started:
        return UpstreamStreamBroken(f"upstream stream failed: {message}")
    return UpstreamUnavailable(f"upstream call failed: {message}")


def _chunk_as_dict(chunk: Any) -> dict[str, Any]:
    """The fields we read from a LiteLLM ``ModelResponseStream``, as a plain chunk dict."""
    choices: list[dict[str, Any]] = []
    for choice in getattr(chunk, "choices", None) or []:
        delta = getattr(choice, "delta", None)
        fields: dict[str, Any] = {
            "content": getattr(delta, "content", None),
            "reasoning_content": getattr(delta, "reasoning_content", None),
        }
        tool_calls = getattr(delta, "tool_calls", None)
        if tool_calls:
            fields["tool_calls"] = [_plain(call) for call in tool_calls]
        choices.append({
            "index": getattr(choice, "index", 0) or 0,
            "finish_reason": getattr(choice, "finish_reason", None),
            "delta": fields,
        })
    result: dict[str, Any] = {
        "id": getattr(chunk, "id", None),
        "model": getattr(chunk, "model", None),
        "created": getattr(chunk, "created", None),
        "system_fingerprint": getattr(chunk, "system_fingerprint", None),
        "choices": choices,
    }
    usage = getattr(chunk, "usage", None)
    if usage is not None:
        dumped = usage.model_dump(exclude_none=True) if hasattr(usage, "model_dump") else usage
        if isinstance(dumped, dict):
            result["usage"] = dumped
    elif not choices:
        # Nothing to read (the server sent ``{}`` or a bare object): LiteLLM still makes a
        # chunk of it, with an id of its own that must not stand in for the server's.
        return {}
    return result


def _plain(value: Any) -> Any:
    """A LiteLLM object as plain JSON values. Its fields the server left out come back as
    None (``id`` and ``function.name`` on every fragment after the first): dropped, so the
    client gets the fragment as the server sent it."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if item is not None}
    return value


async def _close_quietly(client: Any) -> None:
    for method in ("aclose", "close"):
        closer = getattr(client, method, None)
        if callable(closer):
            result = closer()
            if inspect.isawaitable(result):
                await result
            return


class LiteLLMUpstream:
    name = "litellm"

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)

    def build_kwargs(self, request: ChatRequest) -> dict[str, Any]:
        model = self.config.model or request.model
        if not model:
            raise ConfigError("upstream.model: required for the litellm upstream "
                              "(or the request must name a model)")
        options = request.body.get("stream_options")
        kwargs: dict[str, Any] = {
            key: value for key, value in request.body.items() if key not in _OWN_FIELDS
        }
        kwargs.update(
            model=model,
            messages=request.messages,
            stream=True,
            stream_options={**(options if isinstance(options, dict) else {}),
                            "include_usage": True},
            timeout=self._timeout,
            # One attempt: the proxy reports failures rather than stalling a stream on retries.
            max_retries=0,
        )
        if self.config.api_key:
            kwargs["api_key"] = self.config.api_key
        if self.config.url:
            kwargs["api_base"] = self.config.url
        return kwargs

    async def stream(self, request: ChatRequest) -> AsyncIterator[UpstreamEvent]:
        litellm = _litellm()
        kwargs = self.build_kwargs(request)
        try:
            response = await litellm.acompletion(**kwargs)
        except Exception as error:
            raise map_litellm_error(error, started=False) from error
        mapper = ChunkMapper(self.config.think_start, keep_extra=False)
        try:
            iterator = response.__aiter__()
            while True:
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as error:
                    # The HTTP response had begun: a failure now breaks a started stream.
                    raise map_litellm_error(error, started=True) from error
                for event in mapper.feed(_chunk_as_dict(chunk)):
                    yield event
            # LiteLLM invents finish_reason "stop" for a stream that just ended; its own record
            # of whether the provider sent one tells a completed stream from a cut one.
            received = getattr(response, "received_finish_reason", _UNKNOWN)
            intermittent = getattr(response, "intermittent_finish_reason", None)
            if not mapper.finished or (received is None and intermittent is None):
                raise UpstreamStreamBroken("upstream stream ended without a finish reason")
            for event in mapper.end():
                yield event
        finally:
            # Closing the provider stream drops the HTTP connection, which cancels generation.
            await _close_quietly(response)

    async def list_models(self) -> list[dict[str, Any]]:
        model = self.config.model
        if not model:
            return []
        return [{"id": model, "object": "model", "owned_by": "litellm"}]

    async def aclose(self) -> None:
        await close_litellm_clients()


async def close_litellm_clients() -> None:
    """Close the HTTP clients LiteLLM cached for the running event loop.

    LiteLLM keeps one client per (settings, event loop) in a module-level cache and never
    closes it; left open, its sockets leak. Entries of other loops are left alone. Every
    LiteLLM-based backend (this upstream, the llm-judge guard) calls this in its ``aclose``.
    """
    litellm = sys.modules.get("litellm")
    if litellm is None:
        return  # never imported, so nothing cached
    cache = getattr(litellm, "in_memory_llm_clients_cache", None)
    entries = getattr(cache, "cache_dict", None)
    if not isinstance(entries, dict):
        return
    suffix = f"-{id(asyncio.get_running_loop())}"
    ttl = getattr(cache, "ttl_dict", {})
    for key in [key for key in entries if isinstance(key, str) and key.endswith(suffix)]:
        client = entries.pop(key, None)
        if isinstance(ttl, dict):
            ttl.pop(key, None)
        if client is not None:
            await _close_quietly(client)
