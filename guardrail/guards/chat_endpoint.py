"""A guard model behind an OpenAI-compatible server (vLLM, SGLang, TGI...): one request per check,
greedy, with logprobs, and every failure turned into a GuardError that ``guard.on_error`` decides.

Two request shapes: ``chat`` (``POST /chat/completions``; the server applies the model's own chat
template, with ``chat_template_kwargs`` for templates that take a policy, as Granite Guardian and
ShieldGemma do) and ``complete`` (``POST /completions`` with a prompt rendered here, for guards
whose format is applied by hand, as WildGuard's is). Both return the text and, per generated
token, its logprob and top alternatives, in one shape.

``answer_probabilities`` turns those logprobs into the probability of each answer word at the
position where the answer is written: the score of a verdict word.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError

TOP_LOGPROBS = 5
_BODY_IN_ERRORS = 300


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]
    """The most likely tokens at this position with their logprobs (may omit ``token``)."""


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: tuple[TokenLogprob, ...]
    """Empty when the server sent no logprobs."""


class GuardEndpoint:
    """An HTTP client for one guard model at ``guard.url`` (the ``/v1`` base URL)."""

    def __init__(self, config: GuardConfig, *, guard: str, default_model: str) -> None:
        if not config.url:
            raise ConfigError(
                f"guard.url: the {guard} guard needs the base URL of an OpenAI-compatible server "
                "(e.g. http://127.0.0.1:8000/v1), or no url to run the model in-process"
            )
        self.config = config
        self.guard = guard
        self.model = config.model or default_model
        self.base_url = config.url.rstrip("/")
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(config.timeout_s))

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
        return Completion(content, _chat_logprobs(choice.get("logprobs")))

    async def complete(self, prompt: str, *, max_tokens: int) -> Completion:
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
        return Completion(text, _completion_logprobs(choice.get("logprobs")))

    async def aclose(self) -> None:
        await self._client.aclose()

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
                response = await self._client.post(url, json=payload)
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


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _chat_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """``{"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}``."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return ()
    tokens: list[TokenLogprob] = []
    for entry in content:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return ()
        logprob = _number(entry.get("logprob"))
        top = [(str(alt["token"]), value) for alt in entry.get("top_logprobs") or []
               if isinstance(alt, dict) and isinstance(alt.get("token"), str)
               and (value := _number(alt.get("logprob"))) is not None]
        tokens.append(TokenLogprob(entry["token"], logprob if logprob is not None else -math.inf,
                                   tuple(top)))
    return tuple(tokens)


def _completion_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """The completions API's shape: parallel lists ``tokens``, ``token_logprobs`` and
    ``top_logprobs`` (a ``{token: logprob}`` mapping per position)."""
    if not isinstance(logprobs, dict):
        return ()
    names, values, tops = (logprobs.get(key) for key in ("tokens", "token_logprobs",
                                                         "top_logprobs"))
    if not isinstance(names, list) or not isinstance(values, list) or len(names) != len(values):
        return ()
    tops = tops if isinstance(tops, list) and len(tops) == len(names) else [None] * len(names)
    tokens: list[TokenLogprob] = []
    for name, value, top in zip(names, values, tops, strict=True):
        if not isinstance(name, str):
            return ()
        logprob = _number(value)
        alternatives = [(str(token), number) for token, alt in (top or {}).items()
                        if (number := _number(alt)) is not None] if isinstance(top, dict) else []
        tokens.append(TokenLogprob(name, logprob if logprob is not None else -math.inf,
                                   tuple(alternatives)))
    return tuple(tokens)


def answer_probabilities(
    completion: Completion, answer_at: int, words: Sequence[str]
) -> dict[str, float] | None:
    """P(word) among ``words`` (summing to 1) at the token that writes ``completion.text`` from
    character ``answer_at`` on: where the model chose its verdict word.

    A top-logprob token counts for a word when, stripped and lower-cased, it is a non-empty prefix
    of that word (``" Uns"`` for ``Unsafe``): the words must start with different letters, which
    holds for every guard here (safe/unsafe/controversial, yes/no). None when the server sent no
    logprobs, the tokens do not spell the text, or no alternative names an answer word.
    """
    lowered = [word.lower() for word in words]
    if len({word[:1] for word in lowered}) != len(lowered):
        raise ValueError(f"answer words must start with different letters: {list(words)}")
    position = 0
    for token in completion.tokens:
        end = position + len(token.token)
        if completion.text[position:end] != token.token:
            return None  # the tokens do not spell the text: cannot locate the answer
        if position <= answer_at < end and token.token[answer_at - position:].strip():
            return _word_mass(token, lowered, words)
        position = end
    return None


def _word_mass(token: TokenLogprob, lowered: Sequence[str],
               words: Sequence[str]) -> dict[str, float] | None:
    candidates = dict(token.top)
    candidates.setdefault(token.token, token.logprob)  # the chosen token is in the distribution
    mass = dict.fromkeys(words, 0.0)
    for name, logprob in candidates.items():
        stem = name.strip().lower()
        if not stem or logprob == -math.inf:
            continue
        for word, low in zip(words, lowered, strict=True):
            if low.startswith(stem):
                mass[word] += math.exp(min(logprob, 0.0))
                break
    total = sum(mass.values())
    if total <= 0.0:
        return None
    return {word: value / total for word, value in mass.items()}
