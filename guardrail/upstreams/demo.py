"""The demo upstream: replays recorded reasoning traces, so the whole proxy runs on a laptop
with no model server.

A handful of prompts (``DEMO_PROMPTS``) have traces: three safe (maths, code, history) and three
unsafe ones that start reasonably and then turn to complying, with every harmful specific elided.
Prompts match by normalised text (case, whitespace and punctuation ignored; a message that
contains a known prompt also matches). Any other prompt gets a short trace that says what this
is and lists the safe prompts to try.

Continuations: when the last message is the assistant's (how a corrective intervention asks
the model to go on from a cut trace, e.g. with vLLM's ``continue_final_message``), the demo goes
on from there: the rest of its own trace if the partial text is a prefix of it (as a real model
would), otherwise the trace's ``safe_continuation`` (the recovery after a safety trigger).

Streaming is paced like a model: word-sized pieces with a small delay between them
(``chunk_delay_s``; default from ``GUARDRAIL_DEMO_CHUNK_DELAY_MS``, else 8 ms).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from guardrail.config import UpstreamConfig
from guardrail.continuation import (
    AssistantPrefix,
    ChatTemplate,
    ContinuationForm,
    ContinuationUnsupported,
    vllm_continuation_body,
)
from guardrail.events import Channel, Finish, ResponseMeta, TextDelta, UpstreamEvent, Usage
from guardrail.reasoning import CLOSE_TAG, OPEN_TAG
from guardrail.upstreams.base import ChatRequest

DEMO_MODEL = "guardrail-demo"
DEFAULT_CHUNK_DELAY_S = 0.008
DELAY_ENV = "GUARDRAIL_DEMO_CHUNK_DELAY_MS"

_PIECE = re.compile(r"\s*\S+\s*|\s+")
_NOT_WORD = re.compile(r"[^\w]+")


@dataclass(frozen=True)
class SafeContinuation:
    reasoning: str
    answer: str


@dataclass(frozen=True)
class DemoTrace:
    id: str
    label: Literal["safe", "unsafe"]
    prompt: str
    reasoning: str
    answer: str
    compliance_cue: str | None = None
    """The first sentence that commits to the harmful help (unsafe traces)."""
    safe_continuation: SafeContinuation | None = None


@dataclass(frozen=True)
class DemoData:
    traces: tuple[DemoTrace, ...]
    fallback_reasoning: str
    fallback_answer_template: str


@cache
def load_demo_data() -> DemoData:
    raw = json.loads(
        resources.files("guardrail.upstreams").joinpath("demo_traces.json").read_text("utf-8")
    )
    traces = []
    for item in raw["traces"]:
        continuation = item.get("safe_continuation")
        traces.append(DemoTrace(
            id=item["id"],
            label=item["label"],
            prompt=item["prompt"],
            reasoning=item["reasoning"],
            answer=item["answer"],
            compliance_cue=item.get("compliance_cue"),
            safe_continuation=SafeContinuation(**continuation) if continuation else None,
        ))
    return DemoData(
        traces=tuple(traces),
        fallback_reasoning=raw["fallback"]["reasoning"],
        fallback_answer_template=raw["fallback"]["answer"],
    )


DEMO_PROMPTS: list[tuple[str, str]] = [
    (trace.prompt, trace.label) for trace in load_demo_data().traces
]
"""``(prompt, "safe" | "unsafe")`` for every recorded trace."""


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: how prompts are matched."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def find_trace(user_text: str) -> DemoTrace | None:
    """The trace whose prompt equals, or is contained in, the user's message."""
    wanted = normalise(user_text)
    if not wanted:
        return None
    traces = load_demo_data().traces
    for trace in traces:
        if normalise(trace.prompt) == wanted:
            return trace
    padded = f" {wanted} "
    for trace in traces:
        if f" {normalise(trace.prompt)} " in padded:
            return trace
    return None


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def split_pieces(text: str) -> list[str]:
    """Word-sized pieces that concatenate back to ``text`` exactly."""
    return _PIECE.findall(text)


def fallback_reply() -> tuple[str, str]:
    """What the demo writes for a prompt it has no trace of. It names only the safe prompts:
    quoting the unsafe ones in an answer is what a guard should flag."""
    data = load_demo_data()
    prompts = "\n".join(f"- {prompt}" for prompt, label in DEMO_PROMPTS if label == "safe")
    return data.fallback_reasoning, data.fallback_answer_template.replace("{prompts}", prompts)


def continuation(trace: DemoTrace | None, partial: str) -> tuple[str, str]:
    """What the demo model writes after the assistant's ``partial`` text: (reasoning, answer)."""
    reasoning_part, closed, answer_part = partial.partition(CLOSE_TAG)
    stripped = reasoning_part.lstrip()
    if stripped.startswith(OPEN_TAG):
        # The tag and the whitespace around it are template, not reasoning.
        reasoning_part = stripped.removeprefix(OPEN_TAG).lstrip()
    if trace is None:
        reasoning, answer = fallback_reply()
        if closed:
            return "", _rest(answer, answer_part, answer)
        return _joined(reasoning_part, reasoning), answer
    safe = trace.safe_continuation
    if closed:
        # Like a model continuing its answer: where the partial answer is the start of one it
        # knows, the rest of that one; otherwise the safe answer.
        safe_answer = safe.answer if safe else trace.answer
        return "", _rest(trace.answer, answer_part, _rest(safe_answer, answer_part, safe_answer))
    if reasoning_part and trace.reasoning.startswith(reasoning_part):
        return trace.reasoning[len(reasoning_part):], trace.answer
    if safe:
        return _joined(reasoning_part, safe.reasoning), safe.answer
    return "", trace.answer


def _rest(text: str, start: str, otherwise: str) -> str:
    """What follows ``start`` in ``text``, or ``otherwise`` when ``text`` does not begin so."""
    return text[len(start):] if text.startswith(start) else otherwise


def _joined(before: str, text: str) -> str:
    """``text`` going on after ``before``, with a space between sentences if needed."""
    return text if not before or before[-1].isspace() else " " + text


def _word_count(text: str) -> int:
    return len(text.split())


class DemoUpstream:
    name = "demo"

    def __init__(self, config: UpstreamConfig | None = None, *,
                 chunk_delay_s: float | None = None) -> None:
        self.config = config or UpstreamConfig(kind="demo")
        if chunk_delay_s is None:
            configured = os.environ.get(DELAY_ENV)
            chunk_delay_s = float(configured) / 1000 if configured else DEFAULT_CHUNK_DELAY_S
        self.chunk_delay_s = max(0.0, chunk_delay_s)

    def reply_for(self, request: ChatRequest) -> tuple[str, str]:
        """The (reasoning, answer) the demo model writes for this request."""
        messages = [m for m in request.messages if isinstance(m, dict)]
        user_texts = [message_text(m) for m in messages if m.get("role") == "user"]
        trace = find_trace(user_texts[-1]) if user_texts else None
        if messages and messages[-1].get("role") == "assistant":
            return continuation(trace, message_text(messages[-1]))
        if trace is None:
            return fallback_reply()
        return trace.reasoning, trace.answer

    async def stream(self, request: ChatRequest) -> AsyncIterator[UpstreamEvent]:
        reasoning, answer = self.reply_for(request)
        yield ResponseMeta(
            id=f"chatcmpl-demo-{uuid.uuid4().hex}",
            model=DEMO_MODEL,
            created=int(time.time()),
            system_fingerprint="guardrail-demo",
        )
        channel: Channel
        for channel, text in (("reasoning", reasoning), ("answer", answer)):
            for piece in split_pieces(text):
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                yield TextDelta(channel, piece)
        yield Finish("stop")
        prompt_tokens = sum(_word_count(message_text(m)) for m in request.messages
                            if isinstance(m, dict))
        reasoning_tokens = _word_count(reasoning)
        completion_tokens = reasoning_tokens + _word_count(answer)
        yield Usage({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        })

    continuation_forms: tuple[ContinuationForm, ...] = ("vllm",)

    def continue_stream(
        self, request: ChatRequest, prefix: AssistantPrefix, form: ContinuationForm, *,
        categories: tuple[str, ...] = (), template: ChatTemplate | None = None,
        url: str | None = None,
    ) -> AsyncIterator[UpstreamEvent]:
        """Continue a partial assistant turn the way vLLM's continue_final_message does."""
        del categories, template, url  # the demo replays; nothing to render or redirect
        if form != "vllm":
            raise ContinuationUnsupported(f"the demo upstream cannot continue in form {form!r}")
        body = vllm_continuation_body(request.body, prefix)
        return self.stream(ChatRequest(body=body, headers=request.headers))

    async def list_models(self) -> list[dict[str, Any]]:
        return [{"id": DEMO_MODEL, "object": "model", "owned_by": "guardrail"}]

    async def aclose(self) -> None:
        return None
