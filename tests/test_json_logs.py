"""``server.log_format: json``: a real ``guardrail serve``'s stderr is one JSON object per line,
each chat completion with its case id, request id, status and durations; API keys never appear,
and with ``store.redact`` on neither does text (the user's, the model's, or an upstream error's
that quotes it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.loopback import serve_app
from tests.fakes.openai_server import FakeReply, create_fake_openai_app
from tests.serve_process import ServeProcess

CLIENT_KEY = "sk-client-0f6b1c2d9e8a7b6c"
ADMIN_KEY = "sk-admin-5a4b3c2d1e0f9a8b"
WRONG_KEY = "sk-wrong-77aa88bb99cc00dd"
SECRET = "zebra-orchid-4471"
"""A word in the user's text, the model's text and an upstream error: it must not be logged."""


def reply_for(body: dict[str, Any]) -> FakeReply:
    if "fail" in json.dumps(body):
        return FakeReply(http_status=400, error_message=f"cannot take {SECRET} from the prompt")
    return FakeReply(reasoning=f"The user said {SECRET}. Fine.", answer=f"Yes, {SECRET}.")


@pytest.fixture
def model_url() -> Iterator[str]:
    with serve_app(create_fake_openai_app(responder=reply_for)) as url:
        yield url


def test_json_logs_carry_ids_and_never_keys_or_redacted_text(
    tmp_path: Path, model_url: str
) -> None:
    serve = ServeProcess(tmp_path, {
        "upstream": {"url": f"{model_url}/v1"},
        "guard": {"kind": "none"},
        "store": {"url": f"sqlite:///{tmp_path / 'cases.db'}",
                  "fallback_path": str(tmp_path / "unstored.jsonl"),
                  "redact": ["request", "steps.text", "client_reasoning", "client_content"]},
        "server": {"log_format": "json", "api_keys": [CLIENT_KEY],
                   "admin_keys": {"ops": ADMIN_KEY}},
    })
    answered: dict[str, tuple[str, int]] = {}  # case id -> request id, status
    try:
        serve.wait_healthy()
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key=CLIENT_KEY, max_retries=0)
        messages: Any = [{"role": "user", "content": f"tell me about {SECRET}"}]
        plain = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=messages, extra_headers={"x-request-id": "req-abc.1"})
        assert SECRET in (plain.parse().choices[0].message.content or "")
        answered[plain.headers["x-guardrail-case-id"]] = ("req-abc.1", 200)
        streamed = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=messages, stream=True)
        assert SECRET in "".join(chunk.choices[0].delta.content or ""
                                 for chunk in streamed.parse() if chunk.choices)
        answered[streamed.headers["x-guardrail-case-id"]] = (
            streamed.headers["x-request-id"], 200)
        with pytest.raises(openai.BadRequestError) as failed:
            client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": f"fail {SECRET}"}])
        assert failed.value.response.headers["x-request-id"].startswith("req_")
        answered[failed.value.response.headers["x-guardrail-case-id"]] = (
            failed.value.response.headers["x-request-id"], 400)
        # A made-up request id is not logged as given; a wrong key is refused, not logged.
        odd = httpx.post(f"{serve.url}/v1/chat/completions", headers={
            "authorization": f"Bearer {CLIENT_KEY}", "x-request-id": "bad id {injected}"},
            json={"model": "fake-model", "messages": messages})
        answered[odd.headers["x-guardrail-case-id"]] = (odd.headers["x-request-id"], 200)
        assert odd.headers["x-request-id"].startswith("req_")
        assert httpx.post(f"{serve.url}/v1/chat/completions?api_key={CLIENT_KEY}",
                          headers={"authorization": f"Bearer {WRONG_KEY}"},
                          json={"model": "fake-model", "messages": messages}).status_code == 401
        admin = httpx.get(f"{serve.url}/admin/cases", headers={
            "authorization": f"Bearer {ADMIN_KEY}"})
        assert admin.status_code == 200
    finally:
        serve.stop()
    log = serve.stderr()
    for secret in (CLIENT_KEY, ADMIN_KEY, WRONG_KEY, SECRET, "injected"):
        assert secret not in log, f"{secret!r} is in the log"
    entries = [json.loads(line) for line in log.splitlines()]  # every line is one object
    assert all({"time", "level", "logger", "pid"} <= entry.keys() for entry in entries)
    requests = {entry["case_id"]: entry for entry in entries
                if entry.get("event") == "chat_completion"}
    assert set(requests) == set(answered)
    for case_id, (request_id, status) in answered.items():
        entry = requests[case_id]
        assert (entry["request_id"], entry["status"]) == (request_id, status)
        assert entry["total_ms"] is not None and entry["total_ms"] >= 0
    failed_entry = requests[next(case for case, (_, status) in answered.items() if status == 400)]
    assert failed_entry["action"] == "error" and failed_entry["error"] == "UpstreamHTTPError"
    access = [entry for entry in entries if entry.get("event") == "http_request"]
    assert {"POST", "GET"} <= {entry["method"] for entry in access}
    assert all("?" not in entry["path"] for entry in access)
