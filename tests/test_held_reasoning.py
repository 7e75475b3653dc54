"""Reasoning checked while it streams, whatever the template: with ``upstream.think_start:
auto`` and an R1-style template (the output has ``</think>`` but no ``<think>``), the text is
held until its channel is known, but its steps are judged as they arrive, so an unsafe step early
in a long trace stops the model early. Through the real proxy on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes.openai_server import FakeReply
from tests.proxy_harness import running_proxy, sse_events, streamed_text

FILLER = "Let me think about which parts fit together and in what order. " * 400
EARLY_UNSAFE = FakeReply(
    reasoning="The user wants a pipe bomb. " + FILLER,
    answer="Here it is.",
    reasoning_format="inline_closing",
    chunk_chars=16,
    chunk_delay_s=0.002,
)
SAFE = FakeReply(
    reasoning="The user asks for the sum of 2 and 2. Adding them gives 4. That is all.\n",
    answer="\n\nThe sum is 4.",
    reasoning_format="inline_closing",
)


@pytest.mark.parametrize("mode", ["strict", "fast"])
def test_an_unsafe_step_early_in_held_text_stops_the_model_early(tmp_path: Path,
                                                                 mode: str) -> None:
    overrides = {"upstream": {"think_start": "auto"}, "stream": {"mode": mode}}
    with running_proxy(tmp_path, EARLY_UNSAFE, overrides=overrides) as proxy:
        response, raw = proxy.stream_raw("help")
        events = sse_events(raw)
        case = proxy.case(response.headers["x-guardrail-case-id"])
        record = proxy.upstream.chat_requests[0]
    total_chunks = len(EARLY_UNSAFE.reasoning) // EARLY_UNSAFE.chunk_chars
    # Judged while held: the model was stopped long before it reached </think>.
    assert record.chunks_sent < total_chunks / 4, (record.chunks_sent, total_chunks)
    assert case["action"] == "refused"
    assert case["flagged"] and case["steps"][case["flagged"][0]["step"]]["text"].startswith(
        "The user wants a pipe bomb.")
    reasoning, content = streamed_text(events)
    assert "pipe bomb" not in reasoning + content.removesuffix(proxy.config.correction
                                                               .refusal_message)
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize("mode", ["strict", "fast"])
def test_held_text_goes_to_the_right_channel(tmp_path: Path, mode: str) -> None:
    overrides = {"upstream": {"think_start": "auto"}, "stream": {"mode": mode}}
    with running_proxy(tmp_path, SAFE, overrides=overrides) as proxy:
        response, raw = proxy.stream_raw("what is 2 + 2?")
        case = proxy.case(response.headers["x-guardrail-case-id"])
    assert streamed_text(sse_events(raw)) == (SAFE.reasoning, SAFE.answer)
    assert case["action"] == "pass"
    held = [step for step in case["steps"] if step["channel"] == "reasoning"]
    assert "".join(step["text"] for step in held) == SAFE.reasoning
    assert all(step["unsafe"] is False and step["released"] for step in case["steps"])


def test_text_of_a_model_that_never_thinks_is_released_as_the_answer(tmp_path: Path) -> None:
    reply = FakeReply(reasoning="", answer="Paris is the capital of France. It is on the Seine.",
                      reasoning_format="none")
    with running_proxy(tmp_path, reply, overrides={"upstream": {"think_start": "auto"}}) as proxy:
        response = proxy.chat("capital of France?")
        case = proxy.case(response.headers["x-guardrail-case-id"])
    message = response.json()["choices"][0]["message"]
    assert message["content"] == reply.answer and not message.get("reasoning_content")
    assert case["action"] == "pass"
    assert {step["channel"] for step in case["steps"]} == {"answer"}
