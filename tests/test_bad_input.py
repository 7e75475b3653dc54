"""Bad requests get a 4xx with an OpenAI-shaped error body naming what was wrong, never a 500.

Runs the real app on loopback (guard ``none``: the guard plays no part in rejecting input).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.proxy_harness import Proxy, running_proxy

LIMIT = 4096
"""``server.max_body_bytes`` for these tests: small, so an oversize body is quick to send."""

GOOD_MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    # One proxy for the module: every test here is a single request that changes no state.
    tmp_path = tmp_path_factory.mktemp("bad_input")
    with running_proxy(tmp_path, guard="none",
                       overrides={"server": {"max_body_bytes": LIMIT}}) as running:
        yield running


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response has ``status`` and exactly the OpenAI error shape; returns ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


def post_raw(proxy: Proxy, content: bytes | Iterator[bytes]) -> httpx.Response:
    return proxy.client.post("/v1/chat/completions", content=content,
                             headers={"content-type": "application/json"})


def test_a_good_request_passes(proxy: Proxy) -> None:
    # The baseline the rejections below are measured against.
    response = proxy.client.post("/v1/chat/completions",
                                 json={"model": "fake-model", "messages": GOOD_MESSAGES})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"model": "fake-model", "messages": [', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 1500 + b"]" * 1500, "JSON"),  # nested past the recursion limit
        (b'[{"role": "user", "content": "hello"}]', "JSON object"),
        (b'"hello"', "JSON object"),
        (b"null", "JSON object"),
    ],
    ids=["truncated", "empty", "not-utf8", "deeply-nested", "array", "string", "null"],
)
def test_a_body_that_is_not_a_json_object_is_400(
    proxy: Proxy, raw: bytes, fragment: str
) -> None:
    error = assert_openai_error(post_raw(proxy, raw), 400)
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "fake-model"}, "messages"),
        ({"model": "fake-model", "messages": []}, "messages"),
        ({"model": "fake-model", "messages": "hello"}, "messages"),
        ({"model": "fake-model", "messages": {"role": "user", "content": "hello"}}, "messages"),
        ({"model": "fake-model", "messages": [None]}, "messages.0"),
        ({"model": "fake-model", "messages": [{"content": "hello"}]}, "messages.0.role"),
        ({"model": "fake-model", "messages": [{"role": "wizard", "content": "hello"}]},
         "messages.0.role"),
        ({"model": "fake-model",
          "messages": [*GOOD_MESSAGES, {"role": "assistant", "content": 42}]},
         "messages.1.content"),
        ({"model": "fake-model", "messages": GOOD_MESSAGES, "stream": "yes"}, "stream"),
        ({"model": "fake-model", "messages": GOOD_MESSAGES, "stream": 1}, "stream"),
        ({"model": "fake-model", "messages": GOOD_MESSAGES, "n": 2}, "n"),
        ({"model": "fake-model", "messages": GOOD_MESSAGES, "n": 0}, "n"),
        ({"model": 42, "messages": GOOD_MESSAGES}, "model"),
        ({"model": "fake-model", "messages": GOOD_MESSAGES, "stream_options": "usage"},
         "stream_options"),
    ],
    ids=["messages-missing", "messages-empty", "messages-string", "messages-object",
         "message-null", "role-missing", "role-bad", "content-number", "stream-string",
         "stream-int", "n-2", "n-0", "model-number", "stream-options-string"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream-requested"])
def test_a_wrong_field_is_400_naming_the_field(
    proxy: Proxy, body: dict[str, Any], field: str, stream: bool
) -> None:
    if stream and "stream" not in body:
        body = {**body, "stream": True}
    before = len(proxy.upstream.chat_requests)
    error = assert_openai_error(
        proxy.client.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field
    assert error["message"].startswith(f"{field}:"), error["message"]
    assert len(proxy.upstream.chat_requests) == before, "a rejected request reached the model"


def test_stream_null_means_not_streamed(proxy: Proxy) -> None:
    # The OpenAI API allows ``"stream": null``; it is the default, not a type error.
    response = proxy.client.post("/v1/chat/completions", json={
        "model": "fake-model", "messages": GOOD_MESSAGES, "stream": None})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def oversized_body() -> bytes:
    body = json.dumps({"model": "fake-model",
                       "messages": [{"role": "user", "content": "x" * (LIMIT * 2)}]}).encode()
    assert len(body) > LIMIT
    return body


def test_a_body_over_the_limit_with_content_length_is_413(proxy: Proxy) -> None:
    before = len(proxy.upstream.chat_requests)
    error = assert_openai_error(post_raw(proxy, oversized_body()), 413)
    assert error["code"] == "request_too_large"
    assert str(LIMIT) in error["message"]
    assert len(proxy.upstream.chat_requests) == before


def test_a_chunked_body_over_the_limit_is_413(proxy: Proxy) -> None:
    body = oversized_body()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    request = proxy.client.build_request("POST", "/v1/chat/completions", content=chunks(),
                                         headers={"content-type": "application/json"})
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    before = len(proxy.upstream.chat_requests)
    error = assert_openai_error(proxy.client.send(request), 413)
    assert error["code"] == "request_too_large"
    assert len(proxy.upstream.chat_requests) == before


def test_a_body_just_under_the_limit_is_accepted(proxy: Proxy) -> None:
    envelope = json.dumps({"model": "fake-model",
                           "messages": [{"role": "user", "content": ""}]}).encode()
    body = json.dumps({"model": "fake-model", "messages": [
        {"role": "user", "content": "y" * (LIMIT - len(envelope))}]}).encode()
    assert len(body) == LIMIT
    assert post_raw(proxy, body).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completion", "/v2/models", "/admin/nothing", "/"])
def test_an_unknown_route_is_404(proxy: Proxy, path: str) -> None:
    error = assert_openai_error(proxy.client.get(path), 404)
    assert error["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"),
     ("POST", "/v1/models"), ("DELETE", "/admin/cases"), ("POST", "/healthz")],
)
def test_a_wrong_method_is_405(proxy: Proxy, method: str, path: str) -> None:
    response = proxy.client.request(method, path)
    assert_openai_error(response, 405)
    assert response.headers["allow"]


@pytest.mark.parametrize(
    ("query", "field"),
    [("limit=0", "query.limit"), ("limit=many", "query.limit"), ("offset=-1", "query.offset"),
     ("action=exploded", "query.action")],
)
def test_bad_admin_query_parameters_are_400(proxy: Proxy, query: str, field: str) -> None:
    error = assert_openai_error(proxy.client.get(f"/admin/cases?{query}"), 400)
    assert error["param"] == field
    assert error["message"].startswith(f"{field}:")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_upstream_4xx_is_passed_on_as_a_4xx(proxy: Proxy, stream: bool) -> None:
    # The fake vLLM answers 404 (OpenAI-shaped) for a model it does not serve.
    response = proxy.client.post("/v1/chat/completions", json={
        "model": "no-such-model", "messages": GOOD_MESSAGES, "stream": stream})
    error = assert_openai_error(response, 404)
    assert error["type"] == "invalid_request_error"
    assert "no-such-model" in error["message"]
    assert error["code"] == "upstream_http_error"
    case = proxy.case(response.headers["x-guardrail-case-id"])
    assert case["action"] == "error" and "no-such-model" in case["error"]


def test_an_upstream_4xx_on_a_fresh_proxy(tmp_path: Path) -> None:
    # The same through a proxy configured with a fixed upstream model the fake does not serve:
    # every request gets the upstream's 404, the proxy stays healthy.
    overrides = {"upstream": {"model": "missing-model"}, "server": {"max_body_bytes": LIMIT}}
    with running_proxy(tmp_path, guard="none", overrides=overrides) as fresh:
        for _ in range(2):
            error = assert_openai_error(fresh.chat("hi"), 404)
            assert "missing-model" in error["message"]
        assert fresh.client.get("/healthz").json()["status"] == "ok"
