"""``runner: endpoint``: a guard model behind an OpenAI-compatible server (vLLM, SGLang, TGI...).

Greedy completions with logprobs, and every failure turned into a GuardError that
``guard.on_error`` decides. A ``ChatRequest`` is ``POST /chat/completions`` (the server applies
the model's own chat template, with ``chat_template_kwargs`` for templates that take a policy, as
Granite Guardian and ShieldGemma do); a ``PromptRequest`` is ``POST /completions`` with the
prompt the family rendered (WildGuard). Concurrent requests are the server's to batch (vLLM's
continuous batching).

Under load (``benchmarks/load.py --guard llama-guard``), what limits the checks is this client's
CPU, not the server: httpx's connection pool costs O(connections x waiting requests) per request
(3-6 ms of CPU a check with a few hundred in flight, so about 200 checks/s on a core, and every
check of 200 fast streams timed out). Hence aiohttp (as for the upstream), a pool of
``options.max_connections`` kept-alive connections whose waiters queue cheaply, and no timeout
of its own: the check's ``guard.timeout_s`` (``GenerativeGuard.check``, ``StepChecker``) covers
the request. A check waiting for one of the connections is queued behind other checks, not
being judged: it waits for a slot (one per connection) marked as queue wait
(``plumbing/queue_wait``), which its timeout does not count, up to ``guard.max_queue_wait_s``.

``options.completions_batch: N`` (N > 1) sends up to N checks in one ``POST /completions`` with a
list of prompts (vLLM takes one; each choice's ``index`` says whose it is), for the families
that render their own prompt (Llama Guard, Qwen3Guard, ShieldGemma, WildGuard): fewer requests,
less CPU on both sides. The prompt is then the family's rendering of the model's chat template,
not the server's own, so it is off by default. Batches form only under load (``AsyncBatcher``,
which marks a check's wait for a batch as queue wait in the same way).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.generative.runners.text import (
    ChatRequest,
    Completion,
    PromptRequest,
    TextRequest,
    chat_logprobs,
    completion_logprobs,
)
from guardrail.guards.generative.runners.transformers import RUNNER_OPTIONS
from guardrail.guards.plumbing import queue_wait
from guardrail.guards.plumbing.async_batch import AsyncBatcher

TOP_LOGPROBS = 5
_BODY_IN_ERRORS = 300
DEFAULT_MAX_CONNECTIONS = 64
ENDPOINT_OPTIONS = ("max_connections", "completions_batch")
_KEEPALIVE_S = 2.0
"""Under the 5 s after which uvicorn (vLLM's server) closes an idle connection."""


@dataclass(frozen=True)
class EndpointSettings:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Requests in flight to the server at once; more wait (cheaply) for a free connection."""
    completions_batch: int = 1
    """Checks per ``/completions`` request; 1 = one request per check, the server's template."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> EndpointSettings:
        values: dict[str, int] = {}
        for key in ENDPOINT_OPTIONS:
            value = options.get(key, getattr(cls, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"guard.options.{key}: expected an integer >= 1")
            values[key] = value
        return cls(**values)


class GuardEndpoint:
    """An HTTP client for one guard model at ``guard.url`` (the ``/v1`` base URL)."""

    name = "endpoint"
    # The in-process runner's options are accepted (and unused) so that one config serves
    # both runners.
    option_keys = (*RUNNER_OPTIONS, *ENDPOINT_OPTIONS)

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
        self.settings = EndpointSettings.from_options(config.options)
        self._headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._batchers: dict[int, AsyncBatcher[str, Completion]] = {}  # by max_tokens
        # One slot per pooled connection; per event loop, as a semaphore belongs to its loop.
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    @property
    def requests_sent(self) -> int:
        """Batched ``/completions`` requests sent so far (each carried one or more checks)."""
        return sum(batcher.batches for batcher in self._batchers.values())

    def load(self) -> None:
        """Nothing to load: the server holds the model."""

    def special_tokens(self) -> tuple[str, ...]:
        """Unknown here (the tokenizer is the server's): the family's own markers apply."""
        return ()

    async def complete(self, request: TextRequest) -> Completion:
        prompt = (request.prompt if isinstance(request, PromptRequest)
                  else request.fallback_prompt)
        if self.settings.completions_batch > 1 and prompt is not None:
            return await self._batcher(request.max_tokens).submit(prompt)
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

    def _batcher(self, max_tokens: int) -> AsyncBatcher[str, Completion]:
        batcher = self._batchers.get(max_tokens)
        if batcher is None:
            async def run(prompts: list[str]) -> list[Completion]:
                # Not a caller's task: bounded here, as no check's timeout reaches it.
                async with asyncio.timeout(self.config.timeout_s):
                    return await self.complete_prompts(prompts, max_tokens=max_tokens)

            batcher = AsyncBatcher(run, max_batch=self.settings.completions_batch,
                                   max_concurrent=self.settings.max_connections)
            self._batchers[max_tokens] = batcher
        return batcher

    async def complete_prompts(self, prompts: Sequence[str], *, max_tokens: int
                               ) -> list[Completion]:
        """Several prompts in one ``POST /completions``; the completions in order."""
        payload = {
            "model": self.model,
            "prompt": list(prompts),
            "temperature": 0,
            "max_tokens": max_tokens,
            "logprobs": TOP_LOGPROBS,
        }
        body = await self.post("/completions", payload)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise GuardError(f"{self.guard}: expected {len(prompts)} choices for as many "
                             f"prompts: {json.dumps(body)[:_BODY_IN_ERRORS]}")
        by_index: dict[int, Completion] = {}
        for choice in choices:
            index = choice.get("index") if isinstance(choice, dict) else None
            text = choice.get("text") if isinstance(choice, dict) else None
            if not isinstance(index, int) or not isinstance(text, str):
                raise GuardError(f"{self.guard}: a choice without an index or text: "
                                 f"{json.dumps(choice)[:_BODY_IN_ERRORS]}")
            by_index[index] = Completion(text, completion_logprobs(choice.get("logprobs")))
        if sorted(by_index) != list(range(len(prompts))):
            raise GuardError(f"{self.guard}: choice indexes {sorted(by_index)} do not match "
                             f"{len(prompts)} prompts")
        return [by_index[index] for index in range(len(prompts))]

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use, inside the event loop that will use it (aiohttp's requirement),
        # so that building the guard holds nothing that needs closing.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.settings.max_connections,
                                             limit_per_host=0, keepalive_timeout=_KEEPALIVE_S)
            # No total timeout: the check's own covers the wait for a connection and the
            # request; connecting is bounded separately, so a dead server fails fast.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.timeout_s)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers,
                                                  timeout=timeout, trust_env=True)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

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

    @asynccontextmanager
    async def _connection_slot(self) -> AsyncIterator[None]:
        """One of the ``max_connections`` slots for the block; the wait for one, when all are
        taken, is marked as the check's queue wait (the pool itself waits unmarked)."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.settings.max_connections))
        slots = self._slots[1]
        wait = queue_wait.current() if slots.locked() else None
        if wait is not None:
            wait.queued()
        try:
            await slots.acquire()
        finally:
            if wait is not None:
                wait.started()  # given a slot, or given up: queued no longer
        try:
            yield
        finally:
            slots.release()

    async def post(self, path: str, payload: dict[str, Any]) -> Any:
        """POST ``payload`` to ``path`` under the base URL; the decoded JSON answer. No timeout
        of its own: the caller's check has one (a batch has its own, see ``_batcher``)."""
        url = self.base_url + path
        where = f"{self.guard} at {url}"
        data = json.dumps(payload).encode()
        try:
            async with self._connection_slot(), self._http().post(
                    url, data=data, headers={"Content-Type": "application/json"}) as response:
                status, raw = response.status, await response.read()
                reason = response.reason or ""
        except aiohttp.ClientConnectorError as error:
            raise GuardError(f"{where}: cannot connect ({error})") from None
        except TimeoutError:
            raise GuardError(f"{where}: cannot connect within {self.config.timeout_s:g}s"
                             ) from None
        except aiohttp.ClientError as error:
            raise GuardError(f"{where}: request failed ({type(error).__name__}: {error})") from None
        if status >= 400:
            raise GuardError(f"{where}: HTTP {status}: {error_message(raw, reason)}")
        try:
            return json.loads(raw)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            text = raw.decode("utf-8", "replace")
            raise GuardError(f"{where}: response is not JSON: {text[:_BODY_IN_ERRORS]!r}"
                             ) from None


def error_message(raw: bytes, reason: str = "") -> str:
    """The server's own words: vLLM answers ``{"error": {"message": ...}}`` (older versions put
    ``message`` at the top level)."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(raw)
    except ValueError:
        return text[:_BODY_IN_ERRORS] or reason
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:_BODY_IN_ERRORS]
        if isinstance(body.get("message"), str):
            return str(body["message"])[:_BODY_IN_ERRORS]
    return json.dumps(body)[:_BODY_IN_ERRORS]
