"""``guard.kind: llama-guard``: Llama Guard 3 behind an OpenAI-compatible endpoint.

This is how Llama Guard is usually served: ``vllm serve meta-llama/Llama-Guard-3-1B`` (or -8B),
then ``guard: {kind: llama-guard, url: http://host:8000/v1}``. Each check is one
``POST /chat/completions`` with ``[user, assistant]`` messages; the server applies the model's own
chat template, so the prompt is exactly the one the model was trained on.

Deciding: the verdict text gives the categories, and the first word's logprobs give a score,
P(unsafe) / (P(unsafe) + P(safe)) (the model card's recipe). When a score is available the step
is unsafe iff ``score >= guard.threshold``, even where it disagrees with the text: the text is the
greedy reading at 0.5, and the threshold is the user's knob for trading false positives against
misses. Without logprobs the text decides, and the score is recorded as 1.0 / 0.0.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.base import GuardView, Verdict, check_each
from guardrail.guards.chat_endpoint import GuardEndpoint
from guardrail.guards.llama_guard_format import build_messages, parse_verdict, score_from_logprobs

DEFAULT_MODEL = "meta-llama/Llama-Guard-3-1B"
MAX_TOKENS = 20
"""Room for ``\\n\\nunsafe\\nS1,S2,...``; the model stops by itself well before."""
TOP_LOGPROBS = 5
_BODY_IN_ERRORS = 300


class LlamaGuardEndpoint:
    name = "llama-guard"

    def __init__(self, config: GuardConfig) -> None:
        if not config.url:
            raise ConfigError(
                "guard.url: the llama-guard guard needs the base URL of an OpenAI-compatible "
                "server serving Llama Guard 3, e.g. http://127.0.0.1:8000/v1"
            )
        self.config = config
        # The HTTP side (errors, time limit, bearer key) is shared with the other guards.
        self._endpoint = GuardEndpoint(config, guard=self.name, default_model=DEFAULT_MODEL)
        self.model = self._endpoint.model
        self.url = self._endpoint.base_url + "/chat/completions"

    def _payload(self, view: GuardView) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": build_messages(view),
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS,
        }

    async def check(self, view: GuardView) -> Verdict:
        started = time.perf_counter()
        body = await self._endpoint.post("/chat/completions", self._payload(view))
        text, logprobs = _read_choice(body)
        text_unsafe, categories = parse_verdict(text)
        score = score_from_logprobs(logprobs)
        extra: dict[str, str] = {"model": self.model}
        if score is None:
            unsafe = text_unsafe
            score = 1.0 if text_unsafe else 0.0
            extra["score_source"] = "verdict"
        else:
            unsafe = score >= self.config.threshold
            extra["score_source"] = "logprobs"
        if unsafe != text_unsafe:
            # Kept so the audit log shows where the threshold overrode the model's own words.
            extra["text_verdict"] = "unsafe" if text_unsafe else "safe"
        if categories and not unsafe:
            extra["text_categories"] = ",".join(categories)
        return Verdict(
            unsafe=unsafe,
            categories=categories if unsafe else (),
            score=score,
            raw=text,
            latency_s=time.perf_counter() - started,
            extra=extra,
        )

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        """All at once: the server batches concurrent requests (vLLM continuous batching).

        Every check finishes before an error is raised, so no request is left running.
        """
        return await check_each(self.check, views)

    async def aclose(self) -> None:
        await self._endpoint.aclose()


def _read_choice(body: Any) -> tuple[str, Any]:
    """``choices[0].message.content`` and ``choices[0].logprobs`` of a chat completion."""
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise GuardError(
            f"llama-guard: not a chat completion: {json.dumps(body)[:_BODY_IN_ERRORS]}"
        ) from None
    if not isinstance(content, str):
        raise GuardError(f"llama-guard: message content is {type(content).__name__}, not text")
    return content, choice.get("logprobs") if isinstance(choice, dict) else None
