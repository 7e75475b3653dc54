"""What a new user sees with `make serve`: the laptop defaults (demo upstream, embedded CPU
guard, strict, refuse), run as the real app on loopback, driven by the real OpenAI SDK."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from guardrail.config import config_from_mapping
from guardrail.triggers import DEFAULT_TRIGGERS
from guardrail.upstreams.demo import DemoTrace, fallback_reply, load_demo_data
from server.app import create_app
from tests.fakes.loopback import serve_app

TRACES = load_demo_data().traces
# Prompts of one's own, as a new user tries them: the demo has no trace of any of them.
OWN_PROMPTS = [
    "How do I make a sourdough starter?",
    "What's a good way to learn Spanish in six months?",
    "Explain recursion to a ten-year-old.",
    "hi",
]


@pytest.fixture(scope="module")
def default_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("GUARDRAIL_DEMO_CHUNK_DELAY_MS", "0")
    tmp = tmp_path_factory.mktemp("default")
    # Only the store moves into the test's folder; everything else is the default.
    config = config_from_mapping({"store": {"url": f"sqlite:///{tmp / 'cases.db'}",
                                            "fallback_path": str(tmp / 'unstored.jsonl')}})
    assert config.upstream.resolved_kind() == "demo" and config.guard.kind == "embedded"
    # Start-up loads torch and the encoder: allow for a busy machine.
    with serve_app(create_app(config), startup_timeout_s=120) as url:
        yield url
    monkeypatch.undo()


def stream_prompt(url: str, prompt: str) -> tuple[str, str, dict[str, object]]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="guardrail-demo", messages=[{"role": "user", "content": prompt}], stream=True
        )
        reasoning, content = "", ""
        summary: dict[str, object] = {}
        for chunk in stream:
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
            summary = (chunk.model_extra or {}).get("guardrail", summary)
    return reasoning, content, summary


@pytest.mark.parametrize("trace", [t for t in TRACES if t.label == "safe"], ids=lambda t: t.id)
def test_safe_demo_prompts_pass_untouched(default_proxy: str, trace: DemoTrace) -> None:
    reasoning, content, summary = stream_prompt(default_proxy, trace.prompt)
    assert summary["action"] == "pass", summary
    assert (reasoning, content) == (trace.reasoning, trace.answer)


@pytest.mark.parametrize("trace", [t for t in TRACES if t.label == "unsafe"], ids=lambda t: t.id)
def test_unsafe_demo_prompts_are_corrected_midway(default_proxy: str, trace: DemoTrace) -> None:
    reasoning, content, summary = stream_prompt(default_proxy, trace.prompt)
    cue, safe = trace.compliance_cue, trace.safe_continuation
    assert cue is not None and safe is not None, "an unsafe trace names its cue and continuation"
    assert cue not in reasoning  # cut at the commitment, or before it
    assert trace.answer not in content
    assert reasoning.endswith(safe.reasoning)
    # The default correction: cut, one safety trigger in the reasoning, and the demo model
    # goes on safely to one clean answer.
    assert summary["action"] == "intervened", summary
    assert content == safe.answer
    shown = [trigger for trigger in DEFAULT_TRIGGERS if trigger in reasoning + content]
    assert len(shown) == 1 and reasoning.count(shown[0]) == 1 and shown[0] not in content
    case = httpx.get(f"{default_proxy}/admin/cases/{summary['case_id']}").json()
    assert len(case["corrections"]) == 1, case["corrections"]
    first = case["corrections"][0]
    assert first["strategy"] == "intervene" and first["extra"]["form"] == "vllm"
    assert cue in first["withheld"]
    assert first["inserted"].strip() == shown[0]
    # Why the round happened, and how it ended.
    flagged = next(step for step in case["steps"] if step["round"] == 0 and step["unsafe"])
    assert first["cause"].startswith(f"step {flagged['index']} (")
    assert first["outcome"] == "completed"


@pytest.mark.parametrize("prompt", OWN_PROMPTS)
def test_prompts_the_demo_does_not_know_pass_untouched(default_proxy: str, prompt: str) -> None:
    reasoning, content, summary = stream_prompt(default_proxy, prompt)
    assert summary["action"] == "pass", summary
    assert not summary["flagged"]
    assert (reasoning, content) == fallback_reply()
