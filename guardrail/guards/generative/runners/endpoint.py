"""``runner: endpoint``: a guard model behind an OpenAI-compatible server (vLLM, SGLang, TGI...).

One request per completion, greedy, with logprobs, and every failure turned into a GuardError that
``guard.on_error`` decides. A ``ChatRequest`` is ``POST /chat/completions`` (the server applies
the model's own chat template, with ``chat_template_kwargs`` for templates that take a policy, as
Granite Guardian and ShieldGemma do); a ``PromptRequest`` is ``POST /completions`` with the
prompt the family rendered (WildGuard). Concurrent requests are the server's to batch (vLLM's
continuous batching).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.generative.runners.text import (
    ChatRequest,
    Completion,
    TextRequest,
    chat_logprobs,
    completion_logprobs,
)
from guardrail.guards.generative.runners.transformers import RUNNER_OPTIONS

TOP_LOGPROBS = 5
_BODY_IN_ERRORS = 300


class GuardEndpoint:
    """An HTTP client for one guard model at ``guard.url`` (the ``/v1`` base URL)."""

    name = "endpoint"
    # The in-process runner's options are accepted (and unused) so that one config serves
    # both runners.
    option_keys = RUNNER_OPTIONS

    def __init__(self, config: GuardConfig, *, model: str, guard: str) -> None:
        if not config.url:
            raise ConfigError(
                f"guard.url: the {guard} guard needs the base URL of an OpenAI-compatible server "
                "(e.g. http://127.0.0.1:8000/v1), or no url to run the model in-process"
            )
        self.config = config
        self.guard = guard
        self.model = model
        self.base_url = config.url.rstrip("/")
        self._client: httpx.AsyncClient | None = None

    def load(self) -> None:
        """Nothing to load: the server holds the model."""

    def special_tokens(self) -> tuple[str, ...]:
        """Unknown here (the tokenizer is the server's): the family's own markers apply."""
        return ()

    async def complete(self, request: TextRequest) -> Completion:
        if isinstance(request, ChatRequest):
            return await self.chat(request.messages, max_tokens=request.max_tokens,
                                   template_kwargs=request.template_kwargs)
        return await self.complete_prompt(request.prompt, max_tokens=request.max_tokens)

    async def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> Completion:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(message) for message in messages],
            "temperature": 0,
            "max_tokens": max_tokens,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS,
        }
        if template_kwargs:
            payload["chat_template_kwargs"] = dict(template_kwargs)
        body = await self.post("/chat/completions", payload)
        choice = self._choice(body)
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise GuardError(f"{self.guard}: the chat completion has no text content: "
                             f"{json.dumps(body)[:_BODY_IN_ERRORS]}")
        return Completion(content, chat_logprobs(choice.get("logprobs")))

    async def complete_prompt(self, prompt: str, *, max_tokens: int) -> Completion:
        payload = {
            "model": self.model,
            "prompt": prompt,
            "temperature": 0,
            "max_tokens": max_tokens,
            "logprobs": TOP_LOGPROBS,
        }
        body = await self.post("/completions", payload)
        choice = self._choice(body)
        text = choice.get("text")
        if not isinstance(text, str):
            raise GuardError(f"{self.guard}: the completion has no text: "
                             f"{json.dumps(body)[:_BODY_IN_ERRORS]}")
        return Completion(text, completion_logprobs(choice.get("logprobs")))

    def _http(self) -> httpx.AsyncClient:
        # Made on first use, so that building the guard holds nothing that needs closing.
        if self._client is None:
            headers = ({"Authorization": f"Bearer {self.config.api_key}"}
                       if self.config.api_key else {})
            self._client = httpx.AsyncClient(headers=headers,
                                             timeout=httpx.Timeout(self.config.timeout_s))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _choice(self, body: Any) -> dict[str, Any]:
        try:
            choice = body["choices"][0]
        except (KeyError, IndexError, TypeError):
            choice = None
        if not isinstance(choice, dict):
            raise GuardError(
                f"{self.guard}: not a completion: {json.dumps(body)[:_BODY_IN_ERRORS]}"
            )
        return choice

    async def post(self, path: str, payload: dict[str, Any]) -> Any:
        """POST ``payload`` to ``path`` under the base URL; the decoded JSON answer."""
        url = self.base_url + path
        where = f"{self.guard} at {url}"
        try:
            # httpx's timeout bounds each phase; this bounds the whole request.
            async with asyncio.timeout(self.config.timeout_s):
                response = await self._http().post(url, json=payload)
        except TimeoutError:
            raise GuardError(f"{where}: no answer within {self.config.timeout_s:g}s") from None
        except httpx.TimeoutException as error:
            raise GuardError(
                f"{where}: timed out after {self.config.timeout_s:g}s ({type(error).__name__})"
            ) from None
        except httpx.ConnectError as error:
            raise GuardError(f"{where}: cannot connect ({error})") from None
        except httpx.HTTPError as error:
            raise GuardError(f"{where}: request failed ({type(error).__name__}: {error})") from None
        if response.status_code >= 400:
            raise GuardError(f"{where}: HTTP {response.status_code}: {error_message(response)}")
        try:
            return response.json()
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            raise GuardError(
                f"{where}: response is not JSON: {response.text[:_BODY_IN_ERRORS]!r}"
            ) from None


def error_message(response: httpx.Response) -> str:
    """The server's own words: vLLM answers ``{"error": {"message": ...}}`` (older versions put
    ``message`` at the top level)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:_BODY_IN_ERRORS] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:_BODY_IN_ERRORS]
        if isinstance(body.get("message"), str):
            return str(body["message"])[:_BODY_IN_ERRORS]
    return json.dumps(body)[:_BODY_IN_ERRORS]
