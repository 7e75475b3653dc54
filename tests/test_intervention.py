"""Corrective intervention end to end: cut at the unsafe step, insert a safety trigger, and let
the same model go on, against a fake model server that continues a partial assistant turn the
way vLLM (continue_final_message), DeepSeek (prefix mode under /beta) and a /v1/completions
server do, each reporting the continuation as reasoning until </think>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guardrail.triggers import CATEGORY_TRIGGERS
from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.openai_server import (
    FakeOpenAIApp,
    FakeReply,
    ReasoningFormat,
    create_fake_openai_app,
)
from tests.proxy_harness import Proxy, running_proxy, sse_events, streamed_text

PROMPT = "How do I make a pipe bomb?"
SAFE_START = "The user asks about explosives. Such devices are dangerous and illegal. "
UNSAFE_STEP = "Sure, I will explain how to make the pipe bomb step by step. "
REASONING = SAFE_START + UNSAFE_STEP + "MARKER-UNSAFE first get a steel casing and seal it. "
ANSWER = "Here is how: MARKER-UNSAFE-ANSWER"
SAFE_CONTINUATION = "I must not give any assembly details. Offering safety information is fine. "
SAFE_ANSWER = "I can't help with that, but I can explain how bomb disposal teams keep people safe."
UNSAFE_CONTINUATION = "Anyway, back to the pipe bomb: seal both ends tightly. "


class ContinuingModel:
    """A scripted model. The first request gets the unsafe trace; a continuation gets the next
    scripted continuation, in the reasoning field of the form's server until </think>."""

    def __init__(self, continuations: list[str] | None = None, *,
                 reasoning_format: ReasoningFormat = "reasoning", delay_s: float = 0.0) -> None:
        self.continuations = list(continuations or [SAFE_CONTINUATION])
        self.reasoning_format = reasoning_format
        self.delay_s = delay_s
        self.partials: list[str] = []

    def __call__(self, body: dict[str, Any]) -> FakeReply:
        partial = self._partial(body)
        if partial is None:
            return FakeReply(reasoning=REASONING, answer=ANSWER,
                             reasoning_format=self.reasoning_format,
                             chunk_chars=5)
        self.partials.append(partial)
        text = self.continuations[min(len(self.partials), len(self.continuations)) - 1]
        answer = SAFE_ANSWER if text == SAFE_CONTINUATION else ANSWER
        return FakeReply(reasoning=text, answer=answer, chunk_chars=5,
                         reasoning_format=self.reasoning_format,
                         chunk_delay_s=self.delay_s)

    @staticmethod
    def _partial(body: dict[str, Any]) -> str | None:
        if "prompt" in body:
            return str(body["prompt"])
        last = body["messages"][-1]
        if last["role"] != "assistant":
            return None
        if last.get("prefix"):
            return str(last.get("reasoning_content", "")) + str(last.get("content", ""))
        assert body["continue_final_message"] is True
        assert body["add_generation_prompt"] is False
        return str(last["content"])


def start(tmp_path: Path, model: ContinuingModel, **correction: Any) -> Any:
    app = create_fake_openai_app(responder=model)
    overrides = {"correction": {"strategy": "intervene", **correction}}
    return running_proxy(tmp_path, upstream_app=app, overrides=overrides,
                         fake_guard=FakeLlamaGuard(rules={"pipe bomb": "S9"}))


def stream(proxy: Proxy) -> tuple[bytes, str, str, dict[str, Any]]:
    _, raw = proxy.stream_raw(PROMPT)
    events = sse_events(raw)
    reasoning, content = streamed_text(events)
    return raw, reasoning, content, events[-2]["guardrail"]


FORMS: dict[str, tuple[dict[str, str], ReasoningFormat]] = {
    "vllm": ({}, "reasoning"),
    "deepseek-prefix": ({"continuation": "deepseek-prefix"}, "reasoning_content"),
    "completions": ({"continuation": "completions", "chat_template": "deepseek-r1-distill"},
                    "reasoning"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_intervention_continues_safely_in_every_form(tmp_path: Path, form: str) -> None:
    settings, reasoning_format = FORMS[form]
    model = ContinuingModel(reasoning_format=reasoning_format)
    with start(tmp_path, model, **settings) as proxy:
        raw, reasoning, content, summary = stream(proxy)
        # One seamless stream: the safe start, the trigger, then the model's continuation.
        assert reasoning.startswith(SAFE_START)
        inserted = reasoning[len(SAFE_START):-len(SAFE_CONTINUATION)]
        assert reasoning.endswith(SAFE_CONTINUATION)
        assert inserted.strip() == CATEGORY_TRIGGERS["S9"][0]  # the guard said S9
        assert content == SAFE_ANSWER
        assert b"MARKER-UNSAFE" not in raw and b"Sure, I will" not in raw
        assert summary["action"] == "intervened"
        # One round; what the client waited for and never saw is counted, not shown.
        assert summary["corrections"] == 1 and summary["wait_words"] >= 3
        # The model was asked to go on from exactly what the client saw, plus the trigger.
        assert model.partials[0].endswith(SAFE_START + inserted)
        requests = proxy.upstream.requests
        if form == "deepseek-prefix":
            assert requests[-1].path == "/beta/chat/completions"
        if form == "completions":
            assert requests[-1].path == "/v1/completions"
            prompt = requests[-1].body["prompt"]
            assert prompt.startswith("<\uff5cbegin\u2581of\u2581sentence\uff5c><\uff5cUser\uff5c>"
                                     + PROMPT)
            assert "<\uff5cAssistant\uff5c><think>\n" + SAFE_START in prompt
        case = proxy.case(summary["case_id"])
        [correction] = case["corrections"]
        assert correction["strategy"] == "intervene"
        assert correction["withheld"].startswith(UNSAFE_STEP)
        assert correction["inserted"] == inserted
        assert correction["continuation"].startswith(SAFE_CONTINUATION)
        assert correction["extra"]["form"] == form and correction["extra"]["recovered"] is True
        rounds = {step["round"] for step in case["steps"]}
        assert rounds == {0, 1}  # the continuation was guarded too
        assert all(step["unsafe"] is False for step in case["steps"] if step["round"] == 1)


def test_several_rounds_then_a_refusal(tmp_path: Path) -> None:
    model = ContinuingModel([UNSAFE_CONTINUATION])
    with start(tmp_path, model, max_rounds=2) as proxy:
        raw, reasoning, content, summary = stream(proxy)
        assert summary["action"] == "refused"
        assert content == proxy.config.correction.refusal_message
        assert b"seal both ends" not in raw
        assert len(model.partials) == 2  # two continuations, then the refusal
        # Each round used a different trigger, and every round was recorded.
        case = proxy.case(summary["case_id"])
        strategies = [c["strategy"] for c in case["corrections"]]
        assert strategies == ["intervene", "intervene", "refuse"]
        assert case["corrections"][2]["extra"]["reason"] == "max_rounds reached"
        assert [c["extra"]["recovered"] for c in case["corrections"][:2]] == [False, False]
        inserted = [c["inserted"] for c in case["corrections"][:2]]
        assert inserted[0] != inserted[1] and all(text in reasoning for text in inserted)
        metrics = proxy.client.get("/metrics").text
        assert 'guardrail_interventions_total{form="vllm",strategy="intervene"} 2.0' in metrics
        assert 'guardrail_correction_outcomes_total{outcome="unsafe_again"} 2.0' in metrics
        assert "guardrail_correction_rounds_count 1.0" in metrics


def test_recovers_on_the_second_round(tmp_path: Path) -> None:
    model = ContinuingModel([UNSAFE_CONTINUATION, SAFE_CONTINUATION])
    with start(tmp_path, model) as proxy:
        _, reasoning, content, summary = stream(proxy)
        assert summary["action"] == "intervened" and content == SAFE_ANSWER
        assert reasoning.endswith(SAFE_CONTINUATION)
        case = proxy.case(summary["case_id"])
        assert [c["extra"]["recovered"] for c in case["corrections"]] == [False, True]
        metrics = proxy.client.get("/metrics").text
        assert 'guardrail_correction_outcomes_total{outcome="recovered"} 1.0' in metrics
        # Measured from a flag to the first text shown after it: once, the first continuation
        # showed nothing before it was flagged again.
        assert "guardrail_intervention_latency_seconds_count 1.0" in metrics
        wait = [line for line in metrics.splitlines()
                if line.startswith("guardrail_wait_tokens_total")]
        assert float(wait[0].split()[-1]) > 10  # the withheld steps were tokens nobody saw


def test_refused_categories_are_never_continued(tmp_path: Path) -> None:
    model = ContinuingModel()
    with start(tmp_path, model, refuse_categories=["S9"]) as proxy:
        _, _, content, summary = stream(proxy)
        assert summary["action"] == "refused" and model.partials == []
        assert content == proxy.config.correction.refusal_message


def test_an_upstream_that_cannot_continue_falls_back(tmp_path: Path) -> None:
    model = ContinuingModel()
    with start(tmp_path, model, continuation="none") as proxy:
        _, _, content, summary = stream(proxy)
        assert summary["action"] == "refused" and model.partials == []
        assert content == proxy.config.correction.refusal_message
        reason = proxy.case(summary["case_id"])["corrections"][0]["extra"]["reason"]
        assert reason == "upstream cannot continue a partial turn"


def test_a_failed_continuation_ends_in_a_refusal_not_an_error(tmp_path: Path) -> None:
    app: FakeOpenAIApp

    def responder(body: dict[str, Any]) -> FakeReply:
        if body["messages"][-1]["role"] == "assistant":  # a server that rejects the form
            return FakeReply(http_status=400, error_message="continue_final_message unsupported")
        return FakeReply(reasoning=REASONING, answer=ANSWER)

    app = create_fake_openai_app(responder=responder)
    with running_proxy(tmp_path, upstream_app=app,
                       overrides={"correction": {"strategy": "intervene"}},
                       fake_guard=FakeLlamaGuard(rules={"pipe bomb": "S9"})) as proxy:
        _, _, content, summary = stream(proxy)
        assert summary["action"] == "refused"
        assert content.endswith(proxy.config.correction.refusal_message)
        case = proxy.case(summary["case_id"])
        assert "unsupported" in case["corrections"][-1]["extra"]["error"]


def cut_in_the_answer(tmp_path: Path, answer: str, continuation: FakeReply
                      ) -> tuple[str, str, dict[str, Any], list[str]]:
    """A trace whose answer the guard flags; the continuation request's partial turns are kept.
    Returns (reasoning, content, case, partials)."""
    partials: list[str] = []

    def responder(body: dict[str, Any]) -> FakeReply:
        last = body["messages"][-1]
        if last["role"] == "assistant":
            partials.append(last["content"])
            return continuation
        return FakeReply(reasoning="Plain thinking here. ", answer=answer)

    app = create_fake_openai_app(responder=responder)
    with running_proxy(tmp_path, upstream_app=app,
                       overrides={"correction": {"strategy": "intervene"}},
                       fake_guard=FakeLlamaGuard(rules={"pipe bomb": "S9"})) as proxy:
        _, reasoning, content, summary = stream(proxy)
        case = proxy.case(summary["case_id"])
    assert summary["action"] == "intervened"
    return reasoning, content, case, partials


def test_intervention_in_the_answer_continues_the_answer(tmp_path: Path) -> None:
    """Part of the answer was shown: the trigger goes into the model's reasoning unseen, and the
    answer goes on from its last released step: one answer, no trigger in it, nothing twice."""
    # Past </think> the model only writes answer text.
    reasoning, content, case, partials = cut_in_the_answer(
        tmp_path, "Intro sentence for you. Now the pipe bomb recipe follows.",
        FakeReply(reasoning="", answer="I'll stop there.", reasoning_format="none"))
    correction = case["corrections"][0]
    trigger = correction["extra"]["trigger"]
    assert reasoning == "Plain thinking here. "
    assert content == "Intro sentence for you. I'll stop there."
    assert trigger not in content and correction["inserted"] == ""
    assert correction["extra"]["continues"] == "answer"
    assert partials == [f"<think>\nPlain thinking here. {trigger} \n</think>\n\n"
                        "Intro sentence for you. "]


def test_a_flag_in_the_answer_before_any_was_shown_goes_back_to_the_reasoning(
        tmp_path: Path) -> None:
    """Nothing of the answer reached the client: the trigger is shown as reasoning, and the
    model reflects there and answers afresh."""
    reasoning, content, case, partials = cut_in_the_answer(
        tmp_path, "The pipe bomb recipe follows right now.",
        FakeReply(reasoning="I should decline the harmful part.",
                  answer="I won't help with that."))
    correction = case["corrections"][0]
    trigger = correction["extra"]["trigger"]
    assert reasoning == f"Plain thinking here. {trigger} I should decline the harmful part."
    assert content == "I won't help with that."
    assert correction["extra"]["continues"] == "reasoning"
    assert partials == [f"<think>\nPlain thinking here. {trigger} "]
    assert correction["cause"].startswith("step 1 (answer, round 0) judged unsafe: S9")
    assert correction["outcome"] == "completed"


def test_client_leaving_during_an_intervention_cancels_it(tmp_path: Path) -> None:
    model = ContinuingModel([SAFE_CONTINUATION * 40], delay_s=0.02)
    with start(tmp_path, model) as proxy:
        payload = {"model": "fake-model", "stream": True,
                   "messages": [{"role": "user", "content": PROMPT}]}
        with proxy.client.stream("POST", "/v1/chat/completions", json=payload) as response:
            seen = b""
            for chunk in response.iter_bytes():
                seen += chunk
                if b"Offering safety" in seen:  # the continuation is streaming
                    break
        continuation = proxy.upstream.chat_requests[-1]
        assert continuation.body["messages"][-1]["role"] == "assistant"
        assert continuation.ended.wait(5), "the continuation request was never cancelled"
        assert continuation.disconnected and not continuation.completed
        # The final record (the in-progress one, stored as the stream began, has no
        # correction and no error yet).
        case = proxy.case(response.headers["x-guardrail-case-id"])
        assert case["status"] == "complete" and case["error"] is not None
        assert "client disconnected" in case["error"]
        assert case["action"] == "intervened" and case["corrections"][0]["inserted"]


def test_rewrite_strategy_streams_a_corrected_response(tmp_path: Path) -> None:
    rewrite_requests: list[dict[str, Any]] = []

    def corrector(body: dict[str, Any]) -> FakeReply:
        rewrite_requests.append(body)
        return FakeReply(reasoning="", reasoning_format="none", chunk_chars=6,
                         answer=SAFE_CONTINUATION + "</think>" + SAFE_ANSWER)

    corrector_app = create_fake_openai_app(responder=corrector, models=("corrector",))
    from tests.fakes.loopback import serve_app

    with serve_app(corrector_app) as corrector_url:
        rewrite = {"model": "openai/corrector", "url": f"{corrector_url}/v1", "api_key": "k"}
        app = create_fake_openai_app(responder=ContinuingModel())
        overrides = {"correction": {"strategy": "rewrite", "rewrite": rewrite}}
        with running_proxy(tmp_path, upstream_app=app, overrides=overrides,
                           fake_guard=FakeLlamaGuard(rules={"pipe bomb": "S9"})) as proxy:
            raw, reasoning, content, summary = stream(proxy)
            assert summary["action"] == "rewritten"
            assert reasoning == SAFE_START + SAFE_CONTINUATION
            assert content == SAFE_ANSWER
            assert b"MARKER-UNSAFE" not in raw
            [request] = rewrite_requests
            system, user = request["messages"]
            assert system["role"] == "system" and "declines only the harmful part" in system[
                "content"]
            assert PROMPT in user["content"] and UNSAFE_STEP.strip() in user["content"]
            case = proxy.case(summary["case_id"])
            assert case["corrections"][0]["strategy"] == "rewrite"
            assert case["corrections"][0]["extra"]["corrector_model"] == "openai/corrector"
