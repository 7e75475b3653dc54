"""``/readyz`` apart from ``/healthz``: not ready (503) while the guard warms up, ready (200) once
it has, not ready when the store cannot be read or the guard failed to load. The guard here is a
real registered backend whose warm-up the test holds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from guardrail.config import GuardConfig, config_from_mapping
from guardrail.errors import ConfigError
from guardrail.guards import GUARDS
from guardrail.guards.passthrough import PassThroughGuard
from server.app import create_app
from server.services import Services
from tests.fakes.loopback import LoopbackServers
from tests.fakes.openai_server import FakeReply, create_fake_openai_app


class HeldWarmUpGuard(PassThroughGuard):
    """Passes every step; its warm-up waits until the test releases it (or fails if told)."""

    name = "held-warm-up"
    release = threading.Event()
    fail = False

    def __init__(self, config: GuardConfig | None = None) -> None:
        super().__init__(config)

    def warm_up(self) -> None:
        assert type(self).release.wait(30), "the test never released the warm-up"
        if type(self).fail:
            raise ConfigError("guard.model: held-warm-up cannot load (on purpose)")


GUARDS.register("held-warm-up")(HeldWarmUpGuard)


@dataclass
class Served:
    app: FastAPI
    client: httpx.Client

    def chat(self, content: str) -> httpx.Response:
        return self.client.post("/v1/chat/completions", json={
            "model": "fake-model", "messages": [{"role": "user", "content": content}]})

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Served]:
    HeldWarmUpGuard.release.clear()
    HeldWarmUpGuard.fail = False
    try:
        with LoopbackServers() as servers:
            upstream = servers.serve(create_fake_openai_app(FakeReply()))
            app = create_app(config_from_mapping({
                "upstream": {"url": f"{upstream}/v1"},
                "guard": {"kind": "held-warm-up"},
                "store": {"url": f"sqlite:///{tmp_path / 'cases.db'}",
                          "fallback_path": str(tmp_path / "unstored.jsonl")},
            }))
            with httpx.Client(base_url=servers.serve(app), timeout=30) as client:
                yield Served(app, client)
    finally:
        HeldWarmUpGuard.release.set()  # never leave a warm-up thread waiting


def test_not_ready_while_the_guard_warms_then_ready(held: Served) -> None:
    not_ready = held.client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json() == {"status": "not ready", "guard": "warming", "store": "ok",
                                "draining": False}
    assert held.client.get("/healthz").status_code == 200  # alive all along
    with ThreadPoolExecutor(max_workers=1) as pool:
        # A request that arrives meanwhile waits for the warm-up instead of failing.
        early = pool.submit(held.chat, "hello")
        time.sleep(0.3)
        assert not early.done()
        HeldWarmUpGuard.release.set()
        assert early.result(timeout=10).status_code == 200
    ready = held.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "guard": "ready", "store": "ok",
                            "draining": False}


def test_not_ready_when_the_store_cannot_be_read(held: Served) -> None:
    HeldWarmUpGuard.release.set()
    assert wait_ready(held.client).status_code == 200
    asyncio.run(held.services.store.aclose())  # as if the database went away
    broken = held.client.get("/readyz")
    assert broken.status_code == 503
    assert broken.json()["guard"] == "ready"
    assert broken.json()["store"].startswith("unreachable: StoreError")


def test_a_guard_that_fails_to_warm_up_is_never_ready(held: Served) -> None:
    HeldWarmUpGuard.fail = True
    HeldWarmUpGuard.release.set()
    answer = wait_for(lambda: held.client.get("/readyz"),
                      lambda response: response.json()["guard"] != "warming")
    assert answer.status_code == 503
    assert answer.json()["guard"] == "failed"
    assert "held-warm-up cannot load" in answer.json()["guard_error"]
    refused = held.chat("hello")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "not_ready"


def wait_ready(client: httpx.Client) -> httpx.Response:
    return wait_for(lambda: client.get("/readyz"), lambda response: response.status_code == 200)


def wait_for(get: Callable[[], httpx.Response],
             done: Callable[[httpx.Response], bool]) -> httpx.Response:
    deadline = time.monotonic() + 10
    while True:
        response = get()
        if done(response) or time.monotonic() > deadline:
            return response
        time.sleep(0.02)
