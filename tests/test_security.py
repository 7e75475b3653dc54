"""Issue 5, security: CORS off unless configured, a per-key rate limit, keys kept out of logs.
Everything runs through the real app on loopback against the fake upstream."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardrail.config import RateLimitConfig, config_from_mapping
from guardrail.errors import ConfigError
from server.rate_limit import RateLimiter
from tests.fakes.loopback import free_port
from tests.fakes.openai_server import FakeReply
from tests.proxy_harness import Proxy, running_proxy

REPLY = FakeReply(reasoning="A greeting. I greet back.", answer="Hello!")
KEY_A = "sk-rate-a-5d1e"
KEY_B = "sk-rate-b-77f0"
ORIGIN = "https://app.example.com"


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat_body() -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


def preflight(proxy: Proxy, origin: str) -> httpx.Response:
    return proxy.client.options("/v1/chat/completions", headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})


# -- CORS ------------------------------------------------------------------------------------


def test_no_cors_headers_unless_configured(tmp_path: Path) -> None:
    with running_proxy(tmp_path, REPLY, guard="none") as proxy:
        answer = preflight(proxy, ORIGIN)
        assert "access-control-allow-origin" not in answer.headers
        chat = proxy.client.post("/v1/chat/completions", json=chat_body(),
                                 headers={"origin": ORIGIN})
        assert chat.status_code == 200, chat.text
        assert not [name for name in chat.headers if name.startswith("access-control-")]


def test_cors_allows_only_the_configured_origins(tmp_path: Path) -> None:
    overrides = {"server": {"cors_origins": [ORIGIN]}}
    with running_proxy(tmp_path, REPLY, guard="none", overrides=overrides) as proxy:
        allowed = preflight(proxy, ORIGIN)
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        methods = allowed.headers["access-control-allow-methods"]
        assert "POST" in methods and "GET" in methods and "DELETE" not in methods
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()

        chat = proxy.client.post("/v1/chat/completions", json=chat_body(),
                                 headers={"origin": ORIGIN})
        assert chat.status_code == 200, chat.text
        assert chat.headers["access-control-allow-origin"] == ORIGIN
        # Browsers hide response headers unless exposed; clients need the case id.
        assert "x-guardrail-case-id" in chat.headers["access-control-expose-headers"].lower()

        other = preflight(proxy, "https://evil.example.net")
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
        cross = proxy.client.post("/v1/chat/completions", json=chat_body(),
                                  headers={"origin": "https://evil.example.net"})
        assert "access-control-allow-origin" not in cross.headers


# -- rate limit ------------------------------------------------------------------------------


def assert_rate_limited(response: httpx.Response) -> int:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "rate_limit_error" and error["message"]
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


@pytest.fixture
def keyed_limited(tmp_path: Path) -> Iterator[Proxy]:
    overrides = {"server": {"api_keys": [KEY_A, KEY_B],
                            "rate_limit": {"requests_per_minute": 1, "burst": 2}}}
    with running_proxy(tmp_path, REPLY, guard="none", overrides=overrides) as proxy:
        yield proxy


def test_rate_limit_is_per_key(keyed_limited: Proxy) -> None:
    proxy = keyed_limited
    for _ in range(2):
        ok = proxy.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(KEY_A))
        assert ok.status_code == 200, ok.text
    sent = len(proxy.upstream.chat_requests)
    refused = proxy.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(KEY_A))
    # One request a minute, the bucket empty: the next token is about a minute away.
    assert 50 <= assert_rate_limited(refused) <= 60
    assert len(proxy.upstream.chat_requests) == sent, "a rate-limited request went upstream"
    # Another key has its own bucket.
    other = proxy.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(KEY_B))
    assert other.status_code == 200, other.text
    # Other routes are not limited.
    assert proxy.client.get("/v1/models", headers=bearer(KEY_A)).status_code == 200


def test_wrong_keys_share_their_address_bucket(keyed_limited: Proxy) -> None:
    proxy = keyed_limited
    statuses = [proxy.client.post("/v1/chat/completions", json=chat_body(),
                                  headers=bearer(f"sk-guess-{n}")).status_code
                for n in range(3)]
    # Made-up keys do not each get a fresh bucket, so guessing is limited too.
    assert statuses == [401, 401, 429]
    ok = proxy.client.post("/v1/chat/completions", json=chat_body(), headers=bearer(KEY_A))
    assert ok.status_code == 200, ok.text


def test_rate_limit_by_address_without_auth(tmp_path: Path) -> None:
    overrides = {"server": {"rate_limit": {"requests_per_minute": 1}}}
    with running_proxy(tmp_path, REPLY, guard="none", overrides=overrides) as proxy:
        assert proxy.chat().status_code == 200
        assert_rate_limited(proxy.chat())
        stream, _ = proxy.stream_raw()
        assert_rate_limited(stream)


def test_no_limit_by_default(tmp_path: Path) -> None:
    with running_proxy(tmp_path, REPLY, guard="none") as proxy:
        assert [proxy.chat().status_code for _ in range(5)] == [200] * 5


def test_bucket_refills_at_the_configured_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(RateLimitConfig(requests_per_minute=60, burst=3), clock=lambda: now[0])
    assert [limiter.check("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("k") == pytest.approx(1.0)
    now[0] += 0.5
    assert limiter.check("k") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.check("k") == 0.0
    now[0] += 3600
    # Refill stops at the burst size.
    assert [limiter.check("k") for _ in range(4)][-1] > 0
    assert limiter.check("other") == 0.0


@pytest.mark.parametrize("section", [{"requests_per_minute": 0}, {"burst": -1},
                                     {"per_hour": 5}])
def test_bad_rate_limit_config_names_the_field(section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"server\.rate_limit"):
        config_from_mapping({"server": {"rate_limit": section}})


# -- keys never logged -----------------------------------------------------------------------


def test_keys_do_not_reach_the_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # An upstream that refuses connections makes the proxy log an error for a keyed request.
    overrides = {"server": {"api_keys": [KEY_A]},
                 "upstream": {"url": f"http://127.0.0.1:{free_port()}/v1",
                              "connect_timeout_s": 1}}
    caplog.set_level(logging.DEBUG)
    with running_proxy(tmp_path, REPLY, guard="none", overrides=overrides) as proxy:
        failed = proxy.client.post("/v1/chat/completions", json=chat_body(),
                                   headers=bearer(KEY_A))
        assert failed.status_code >= 500
        wrong = proxy.client.post("/v1/chat/completions", json=chat_body(),
                                  headers=bearer(KEY_B))
        assert wrong.status_code == 401
    assert caplog.records, "nothing was logged, so this test shows nothing"
    assert KEY_A not in caplog.text and KEY_B not in caplog.text
