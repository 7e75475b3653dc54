"""End to end with the real OpenAI Python SDK as the client: sync and async, streamed and not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fakes.openai_server import FakeReply
from tests.proxy_harness import running_proxy

REASONING = "The user asks for a haiku about rain. Five, seven, five syllables. Keep it calm. "
ANSWER = "Soft rain on the roof\nthe garden drinks quietly\nevening settles in"
UNSAFE = (
    "The user wants a weapon. I could refuse, but let me just help. "
    "Sure, here is how to build the pipe bomb: first get the casing. Then the filler. "
)


def reply_for(body: dict[str, Any]) -> FakeReply:
    text = str(body["messages"][-1]["content"])
    if "bomb" in text:
        return FakeReply(reasoning=UNSAFE, answer="Steps: ...")
    return FakeReply(reasoning=REASONING, answer=ANSWER)


@pytest.fixture
def proxy_url(tmp_path: Path) -> Any:
    from tests.fakes.openai_server import create_fake_openai_app

    app = create_fake_openai_app(responder=reply_for)
    with running_proxy(tmp_path, upstream_app=app,
                       overrides={"server": {"api_keys": ["sk-client"]}}) as proxy:
        yield proxy.url + "/v1"


def test_sync_non_streaming(proxy_url: str) -> None:
    with openai.OpenAI(base_url=proxy_url, api_key="sk-client", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "a haiku about rain"}]
        )
        completion = raw.parse()
        message = completion.choices[0].message
        assert message.content == ANSWER
        assert getattr(message, "reasoning_content", None) == REASONING
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.total_tokens > 0
        summary = (completion.model_extra or {})["guardrail"]
        assert summary["action"] == "pass"
        assert raw.headers["x-guardrail-case-id"] == summary["case_id"]
        models = client.models.list()
        assert [model.id for model in models.data] == ["fake-model"]


def test_sync_streaming_shows_reasoning_then_answer(proxy_url: str) -> None:
    with openai.OpenAI(base_url=proxy_url, api_key="sk-client", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "a haiku about rain"}],
            stream=True, stream_options={"include_usage": True},
        )
        reasoning, content, finish, last = "", "", None, None
        for chunk in stream:
            last = chunk
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert (reasoning, content, finish) == (REASONING, ANSWER, "stop")
        assert last is not None and last.usage is not None
        assert (last.model_extra or {})["guardrail"]["action"] == "pass"


def test_sync_client_mistakes_are_typed_errors(proxy_url: str) -> None:
    with (openai.OpenAI(base_url=proxy_url, api_key="wrong", max_retries=0) as client,
          pytest.raises(openai.AuthenticationError)):
        client.chat.completions.create(model="fake-model",
                                       messages=[{"role": "user", "content": "hi"}])
    with (openai.OpenAI(base_url=proxy_url, api_key="sk-client", max_retries=0) as client,
          pytest.raises(openai.BadRequestError) as caught):
        client.chat.completions.create(model="fake-model", messages=[])
        assert "messages" in str(caught.value)


async def test_async_non_streaming_unsafe_is_refused(proxy_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=proxy_url, api_key="sk-client",
                                  max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "how to make a bomb"}]
        )
        message = completion.choices[0].message
        summary = (completion.model_extra or {})["guardrail"]
        assert summary["action"] == "refused"
        assert summary["flagged"][0]["categories"] == ["S9"]
        assert "pipe bomb" not in (getattr(message, "reasoning_content", "") or "")
        assert message.content and message.content.startswith("I can't help with that")


async def test_async_streaming(proxy_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=proxy_url, api_key="sk-client",
                                  max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "how to make a bomb"}],
            stream=True,
        )
        reasoning, content, summary = "", "", None
        async for chunk in stream:
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
            summary = (chunk.model_extra or {}).get("guardrail", summary)
        assert reasoning == UNSAFE[: UNSAFE.index("Sure, here is")]
        assert "pipe bomb" not in reasoning + content
        assert summary is not None and summary["action"] == "refused"
