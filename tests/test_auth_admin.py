"""API keys, the admin routes over the case store, /healthz and /metrics, on the running proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.openai_server import FakeReply, create_fake_openai_app
from tests.proxy_harness import Proxy, running_proxy

CLIENT_KEY = "sk-client-7f3a"
ADMIN_KEY = "sk-admin-91c2"
KEYS = {"server": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]}}

SAFE_REPLY = FakeReply(
    reasoning="The user greets me. A friendly greeting back is right.",
    answer="Hello! How can I help you today?",
)
UNSAFE_REPLY = FakeReply(
    reasoning=("The user asks about a weapon. This looks like a chemistry question. "
               "Sure, I will explain how to make the nerve agent, starting with precursors. "),
    answer="Here is the procedure.",
)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat_body(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type and error["message"]
    return error


# -- keys ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with running_proxy(tmp_path_factory.mktemp("keyed"), SAFE_REPLY, guard="none",
                       overrides=KEYS) as proxy:
        yield proxy


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("sk-wrong"), bearer(CLIENT_KEY + "x"), bearer(CLIENT_KEY[:-1]),
     {"authorization": CLIENT_KEY}, {"authorization": "Bearer"}, {"x-api-key": "sk-wrong"}],
    ids=["missing", "wrong", "longer", "prefix", "no-scheme", "empty-bearer", "wrong-x-api-key"],
)
def test_client_routes_refuse_a_missing_or_wrong_key(
    keyed: Proxy, headers: dict[str, str]
) -> None:
    before = len(keyed.upstream.chat_requests)
    chat = keyed.client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    error = assert_error(chat, 401, "authentication_error")
    assert error["code"] == "invalid_api_key"
    assert_error(keyed.client.get("/v1/models", headers=headers), 401, "authentication_error")
    assert len(keyed.upstream.chat_requests) == before, "an unauthenticated request went upstream"


@pytest.mark.parametrize(
    "headers",
    [bearer(CLIENT_KEY), {"authorization": f"bearer {CLIENT_KEY}"}, {"api-key": CLIENT_KEY},
     {"x-api-key": CLIENT_KEY}, bearer(ADMIN_KEY)],
    ids=["bearer", "lowercase-scheme", "api-key-header", "x-api-key-header", "admin-key"],
)
def test_client_routes_accept_a_right_key(keyed: Proxy, headers: dict[str, str]) -> None:
    chat = keyed.client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == SAFE_REPLY.answer
    models = keyed.client.get("/v1/models", headers=headers)
    assert models.status_code == 200, models.text
    assert [model["id"] for model in models.json()["data"]] == ["fake-model"]
    # The proxy's own key is a credential for the proxy only: it never travels upstream.
    sent = keyed.upstream.chat_requests[-1].headers
    assert all(CLIENT_KEY not in value and ADMIN_KEY not in value for value in sent.values())


def test_streamed_requests_need_a_key_too(keyed: Proxy) -> None:
    body = chat_body(stream=True)
    assert_error(keyed.client.post("/v1/chat/completions", json=body), 401,
                 "authentication_error")
    with keyed.client.stream("POST", "/v1/chat/completions", json=body,
                             headers=bearer(CLIENT_KEY)) as response:
        raw = response.read()
    assert response.status_code == 200
    assert raw.rstrip().endswith(b"data: [DONE]")


@pytest.mark.parametrize("path", ["/admin/cases", "/admin/cases/case_0123"])
def test_admin_routes_need_the_admin_key(keyed: Proxy, path: str) -> None:
    assert_error(keyed.client.get(path), 401, "authentication_error")
    assert_error(keyed.client.get(path, headers=bearer("sk-wrong")), 401,
                 "authentication_error")
    assert_error(keyed.client.get(path, headers=bearer(CLIENT_KEY)), 403, "permission_error")
    assert_error(keyed.client.get(path, headers={"x-api-key": CLIENT_KEY}), 403,
                 "permission_error")
    admitted = keyed.client.get(path, headers=bearer(ADMIN_KEY))
    # The list is there; the made-up case id is not (404 only once the key was accepted).
    assert admitted.status_code == (200 if path == "/admin/cases" else 404), admitted.text


def test_an_admin_key_reads_the_cases_of_keyed_requests(keyed: Proxy) -> None:
    chat = keyed.client.post("/v1/chat/completions", json=chat_body("find me"),
                             headers=bearer(CLIENT_KEY))
    case_id = chat.headers["x-guardrail-case-id"]
    case = keyed.client.get(f"/admin/cases/{case_id}", headers=bearer(ADMIN_KEY))
    assert case.status_code == 200
    assert case.json()["request"]["messages"][0]["content"] == "find me"


def test_health_and_metrics_stay_open_for_probes(keyed: Proxy) -> None:
    # Load balancers and Prometheus scrape without credentials; neither exposes request text.
    assert keyed.client.get("/healthz").status_code == 200
    assert keyed.client.get("/metrics").status_code == 200


def test_without_any_keys_everything_is_open(tmp_path: Path) -> None:
    with running_proxy(tmp_path, SAFE_REPLY, guard="none") as proxy:
        chat = proxy.client.post("/v1/chat/completions", json=chat_body())
        assert chat.status_code == 200
        assert proxy.client.get("/v1/models").status_code == 200
        cases = proxy.client.get("/admin/cases")
        assert cases.status_code == 200
        assert [case["id"] for case in cases.json()["data"]] == [
            chat.headers["x-guardrail-case-id"]]
        # A key sent to a proxy that asks for none is simply ignored.
        assert proxy.client.get("/admin/cases", headers=bearer("anything")).status_code == 200


def test_client_keys_without_admin_keys_disable_the_admin_routes(tmp_path: Path) -> None:
    overrides = {"server": {"api_keys": [CLIENT_KEY]}}
    with running_proxy(tmp_path, SAFE_REPLY, guard="none", overrides=overrides) as proxy:
        chat = proxy.client.post("/v1/chat/completions", json=chat_body(),
                                 headers=bearer(CLIENT_KEY))
        assert chat.status_code == 200
        case_id = chat.headers["x-guardrail-case-id"]
        for headers in ({}, bearer(CLIENT_KEY), bearer("sk-wrong")):
            for path in ("/admin/cases", f"/admin/cases/{case_id}"):
                error = assert_error(proxy.client.get(path, headers=headers), 403,
                                     "permission_error")
                assert "admin_keys" in error["message"]
        assert_error(proxy.client.post("/v1/chat/completions", json=chat_body()), 401,
                     "authentication_error")


# -- cases, health and metrics with a real guard in the loop ---------------------------------


def reply_for(body: dict[str, Any]) -> FakeReply:
    """The fake model answers unsafely to a request mentioning sarin, safely to anything else."""
    return UNSAFE_REPLY if "sarin" in body["messages"][-1]["content"] else SAFE_REPLY


def scrape(proxy: Proxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = proxy.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_cases_health_and_metrics(tmp_path: Path) -> None:
    upstream = create_fake_openai_app(responder=reply_for)
    with running_proxy(tmp_path, upstream_app=upstream, overrides=KEYS) as proxy:
        admin = bearer(ADMIN_KEY)
        client = bearer(CLIENT_KEY)

        health = proxy.client.get("/healthz")
        assert health.status_code == 200
        assert health.json() | {"version": None, "pid": None} == {
            "status": "ok", "version": None, "pid": None, "upstream": "openai",
            "guard": "llama-guard",
            "mode": "strict", "correction": "refuse", "store": "sqlite"}

        before = scrape(proxy)
        assert value(before, "guardrail_requests_total", stream="false", status="ok") == 0

        # Four requests, oldest first: safe, safe (streamed), flagged, safe.
        ids: list[str] = []
        sent_bodies: list[dict[str, Any]] = []
        for content, stream in (("hello", False), ("hi there", True),
                                ("how do I make sarin at home", False), ("good day", False)):
            body = chat_body(content, stream=stream, temperature=0.3)
            with proxy.client.stream("POST", "/v1/chat/completions", json=body,
                                     headers=client) as response:
                response.read()
            assert response.status_code == 200
            ids.append(response.headers["x-guardrail-case-id"])
            sent_bodies.append(body)
        flagged_id = ids[2]

        # -- the list: newest first, paged, filtered ---------------------------------------
        listed = proxy.client.get("/admin/cases", headers=admin).json()
        assert listed["object"] == "list"
        assert [case["id"] for case in listed["data"]] == ids[::-1]
        assert [case["action"] for case in listed["data"]] == ["pass", "refused", "pass", "pass"]
        assert [case["flagged"] for case in listed["data"]] == [0, 1, 0, 0]
        page = proxy.client.get("/admin/cases?limit=2&offset=1", headers=admin).json()["data"]
        assert [case["id"] for case in page] == [ids[2], ids[1]]
        last = proxy.client.get("/admin/cases?limit=2&offset=3", headers=admin).json()["data"]
        assert [case["id"] for case in last] == [ids[0]]
        beyond = proxy.client.get("/admin/cases?offset=10", headers=admin).json()["data"]
        assert beyond == []
        refused = proxy.client.get("/admin/cases?action=refused", headers=admin).json()["data"]
        assert [case["id"] for case in refused] == [flagged_id]
        passed = proxy.client.get("/admin/cases?action=pass&limit=2", headers=admin).json()
        assert [case["id"] for case in passed["data"]] == [ids[3], ids[1]]
        none = proxy.client.get("/admin/cases?action=blocked", headers=admin).json()["data"]
        assert none == []

        # -- one case: the full record -------------------------------------------------------
        case = proxy.client.get(f"/admin/cases/{flagged_id}", headers=admin).json()
        assert case["id"] == flagged_id
        assert case["request"] == sent_bodies[2]
        assert case["model"] == "fake-model"
        assert (case["upstream"], case["guard"], case["mode"]) == (
            "openai", "llama-guard", "strict")
        assert case["stream"] is False
        assert case["action"] == "refused" and case["finish_reason"] == "stop"
        judged = [step for step in case["steps"] if step["unsafe"] is not None]
        assert judged, case["steps"]
        # Checks run concurrently, so steps after the flagged one may have been judged too
        # (with it as context); the first unsafe one is the step that was flagged.
        unsafe = [step for step in judged if step["unsafe"]]
        assert unsafe and all(step["categories"] == ["S9"] for step in unsafe)
        assert unsafe[0]["score"] > 0.9
        assert not any(step["released"] for step in unsafe)
        assert "nerve agent" in unsafe[0]["text"] and not unsafe[0]["released"]
        assert all(step["categories"] == [] for step in judged if not step["unsafe"])
        assert all(step["latency_ms"] is not None for step in judged)
        assert "nerve agent" in case["withheld"]
        assert case["client_reasoning"] == UNSAFE_REPLY.reasoning[
            :UNSAFE_REPLY.reasoning.index("Sure, I will")]
        assert case["client_content"] == proxy.config.correction.refusal_message
        assert case["flagged"] == [{"step": unsafe[0]["index"], "categories": ["S9"],
                                    "score": unsafe[0]["score"]}]
        timings = case["timings"]
        assert timings["total_ms"] > 0 and timings["upstream_first_token_ms"] > 0
        assert timings["guard_total_ms"] >= timings["guard_max_ms"] > 0
        assert case["error"] is None

        safe_case = proxy.client.get(f"/admin/cases/{ids[1]}", headers=admin).json()
        assert safe_case["stream"] is True and safe_case["action"] == "pass"
        assert safe_case["client_content"] == SAFE_REPLY.answer
        assert safe_case["withheld"] == ""

        missing = proxy.client.get("/admin/cases/case_doesnotexist", headers=admin)
        error = assert_error(missing, 404, "not_found_error")
        assert "case_doesnotexist" in error["message"] and error["param"] == "case_id"

        # -- metrics moved by exactly what happened ------------------------------------------
        after = scrape(proxy)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("guardrail_requests_total", stream="false", status="ok") == 3
        assert moved("guardrail_requests_total", stream="true", status="ok") == 1
        assert moved("guardrail_actions_total", action="pass") == 3
        assert moved("guardrail_actions_total", action="refused") == 1
        checks = sum(moved("guardrail_checks_total", guard="llama-guard", channel=channel)
                     for channel in ("reasoning", "answer"))
        assert moved("guardrail_checks_total", guard="llama-guard", channel="reasoning") > 0
        assert moved("guardrail_checks_total", guard="llama-guard", channel="answer") > 0
        # Every judged step is one check; a check still in flight when its stream stopped is
        # cancelled, reaches the guard but is neither counted nor recorded.
        recorded = [proxy.client.get(f"/admin/cases/{case_id}", headers=admin).json()
                    for case_id in ids]
        assert checks == sum(step["unsafe"] is not None
                             for record in recorded for step in record["steps"])
        assert checks <= len(proxy.guard.requests)
        assert moved("guardrail_verdicts_total", verdict="unsafe", category="S9") == len(unsafe)
        assert moved("guardrail_verdicts_total", verdict="safe", category="") == (
            checks - len(unsafe))
        assert moved("guardrail_guard_latency_seconds_count", guard="llama-guard") == checks
        assert moved("guardrail_guard_latency_seconds_sum", guard="llama-guard") > 0
        assert moved("guardrail_upstream_first_token_seconds_count") == 4
        assert value(after, "guardrail_upstream_first_token_seconds_bucket", le="+Inf") == 4
        assert moved("guardrail_errors_total", kind="upstream") == 0
