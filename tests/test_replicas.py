"""Two replicas behind one PostgreSQL case store: two ``guardrail serve`` processes on loopback,
one real PostgreSQL, both write at once, and the admin API of either reads every case (and a
review label set through one is seen through the other)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.loopback import serve_app
from tests.fakes.openai_server import FakeReply, create_fake_openai_app
from tests.serve_process import ServeProcess

ADMIN = {"authorization": "Bearer sk-admin-replicas"}
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "2+2?"}]}


@pytest.fixture
def fake_model() -> Iterator[str]:
    reply = FakeReply(reasoning="Two and two. That makes four.", answer="2 + 2 = 4.")
    with serve_app(create_fake_openai_app(reply)) as url:
        yield url


def test_two_replicas_share_one_postgresql_store(
    tmp_path: Path, fake_model: str, pg_schema_url: str
) -> None:
    config: dict[str, Any] = {
        "upstream": {"url": f"{fake_model}/v1"},
        "guard": {"kind": "none"},
        "store": {"url": pg_schema_url, "fallback_path": str(tmp_path / "unstored.jsonl")},
        "server": {"admin_keys": ["sk-admin-replicas"]},
    }
    replicas = [ServeProcess(tmp_path, config, name=f"replica-{n}") for n in (1, 2)]
    try:
        for replica in replicas:
            replica.wait_healthy()
        pids = {httpx.get(replica.url + "/healthz").json()["pid"] for replica in replicas}
        assert len(pids) == 2

        def one(index: int) -> str:
            replica = replicas[index % 2]
            response = httpx.post(replica.url + "/v1/chat/completions", timeout=30,
                                  json={**BODY, "stream": index % 3 == 0})
            assert response.status_code == 200, response.text
            return response.headers["x-guardrail-case-id"]

        with ThreadPoolExecutor(max_workers=8) as pool:  # both write at the same time
            written = set(pool.map(one, range(24)))
        assert len(written) == 24
        for replica in replicas:
            listed = httpx.get(replica.url + "/admin/cases", params={"limit": 100},
                               headers=ADMIN).json()["data"]
            assert {case["id"] for case in listed} == written
        # A case written through one replica, labelled through the other, read back on the first.
        case_id = sorted(written)[0]
        labelled = httpx.post(f"{replicas[1].url}/admin/cases/{case_id}/label", headers=ADMIN,
                              json={"label": "false_positive", "note": "checked"})
        assert labelled.status_code == 200, labelled.text
        seen = httpx.get(f"{replicas[0].url}/admin/cases/{case_id}", headers=ADMIN).json()
        assert seen["review"]["label"] == "false_positive" and seen["status"] == "complete"
        for replica in replicas:
            assert httpx.get(replica.url + "/readyz").json()["store"] == "ok"
    finally:
        for replica in replicas:
            replica.stop()
    assert not (tmp_path / "unstored.jsonl").exists()
