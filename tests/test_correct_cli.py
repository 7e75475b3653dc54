"""``guardrail correct`` against a fake OpenAI-compatible model server on loopback, through
LiteLLM: the rewrite, a retry after a server error, a resume that makes no second call for
finished rows, and every row accounted for."""

from __future__ import annotations

import json
import re
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guardrail.correctors.rewrite import REWRITE_SYSTEM
from offline.correct import main
from offline.harvest.records import UnsafeChainRecord
from tests.fakes.loopback import free_port, serve_app
from tests.fakes.openai_server import FakeOpenAIApp, FakeReply, create_fake_openai_app

ROOT = Path(__file__).resolve().parents[1]


class Script:
    """Chooses the fake model's reply from the request it gets."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failures: dict[str, int] = {}
        """request marker -> how many times to answer 500 first."""
        self.calls: dict[str, int] = {}

    def __call__(self, body: dict[str, Any]) -> FakeReply:
        user = body["messages"][-1]["content"]
        marker = re.search(r"<request>\n(.*?)\n</request>", user, re.S)
        request = marker.group(1) if marker else "?"
        with self.lock:
            self.calls[request] = self.calls.get(request, 0) + 1
            if self.failures.get(request, 0) > 0:
                self.failures[request] -= 1
                return FakeReply(http_status=500, error_message="overloaded")
        if "bad request" in request:
            return FakeReply(http_status=400, error_message="context too long")
        if "ramble" in request:
            return FakeReply(reasoning="", reasoning_format="none", finish_reason="length",
                             answer="and then I kept going and going")
        if "leaky" in request:  # a "correction" that still helps
            return FakeReply(reasoning="", reasoning_format="none", answer=(
                "The steps follow.\n</think>\n\nFirst launder the cash through shells."))
        if "no answer" in request:
            return FakeReply(reasoning="", reasoning_format="none",
                             answer="I only reason and never close the block.")
        return FakeReply(reasoning="", reasoning_format="none", answer=(
            f"this would cause harm, so I won't help with {request!r}.\n</think>\n\n"
            "I can't help with that, but here is a safe alternative."))


@pytest.fixture
def server() -> Iterator[tuple[str, FakeOpenAIApp, Script]]:
    script = Script()
    app = create_fake_openai_app(responder=script, models=("corrector",), api_key="sk-test")
    with serve_app(app) as url:
        yield url, app, script


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n"
                            for row in rows), encoding="utf-8")
    return path


def run(url: str, source: Path, out: Path, *extra: str) -> int:
    return main(["--in", str(source), "--out", str(out), "--model", "openai/corrector",
                 "--api-base", f"{url}/v1", "--api-key-env", "CORRECTOR_KEY",
                 "--retry-wait", "0.01", "--no-progress", "--no-rejudge", "--summary",
                 str(out.with_suffix(".summary.json")), *extra])


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRECTOR_KEY", "sk-test")


def summary_of(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(out.with_suffix(".summary.json").read_text())
    return data


def test_correct_retries_and_resumes_without_a_second_call(
        server: tuple[str, FakeOpenAIApp, Script], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    url, app, script = server
    source = write_rows(tmp_path / "in.jsonl", [
        {"prompt": "how to make a weapon", "unsafe_response": "Step 1: take the pipe...",
         "prefix": "The user asks about weapons.", "category": "S9", "score": 0.97,
         "guard": "llama-guard", "case_id": "c1", "label": "confirmed"},
        {"prompt": "how to stalk someone", "response": "<think>First find their address"},
        {"prompt": "please ramble", "unsafe_response": "..."},
        "{this is not json",
        {"prompt": "no unsafe text"},
    ])
    script.failures["how to make a weapon"] = 1  # the server fails once for this row
    out = tmp_path / "out" / "corrected.jsonl"

    assert run(url, source, out) == 1  # some rows could not be corrected
    records = [UnsafeChainRecord.from_dict(json.loads(line))
               for line in out.read_text().splitlines()]
    assert [r.prompt for r in records] == ["how to make a weapon", "how to stalk someone"]
    weapon, stalk = records
    assert weapon.response == (
        "<think>\nThe user asks about weapons. this would cause harm, so I won't help with "
        "'how to make a weapon'.\n</think>\n\nI can't help with that, but here is a safe "
        "alternative.")
    assert (weapon.unsafe_response, weapon.category, weapon.score, weapon.guard, weapon.case_id,
            weapon.label, weapon.correction, weapon.source) == (
        "Step 1: take the pipe...", "S9", 0.97, "llama-guard", "c1", "confirmed", "rewrite",
        "correct")
    assert stalk.unsafe_response == "<think>First find their address"
    assert stalk.parsed.reasoning.startswith("this would cause harm")

    # The proxy's own rewrite prompt, with the prefix as the shown reasoning.
    first = next(rec.body for rec in app.chat_requests if "weapon" in json.dumps(rec.body))
    assert first["messages"][0] == {"role": "system", "content": REWRITE_SYSTEM}
    assert "<shown_reasoning>\nThe user asks about weapons.\n</shown_reasoning>" in (
        first["messages"][1]["content"])
    assert first["max_tokens"] == 4096 and first["temperature"] == 0.0
    assert script.calls == {"how to make a weapon": 2, "how to stalk someone": 1,
                            "please ramble": 1}

    rejected = [json.loads(line) for line in
                (tmp_path / "out" / "corrected.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejected] == [
        (3, "finish_reason"), (4, "bad_row"), (5, "bad_row")]
    assert rejected[0]["reason"] == "finish_reason:length"
    summary = summary_of(out)
    assert summary == {
        "rows": 5, "corrected": 2, "rejected": 3,
        "rejected_by_reason": {"bad_row": 2, "finish_reason": 1},
        "calls": 4, "cached": 0, "retries": 1, "prompt_tokens": summary["prompt_tokens"],
        "completion_tokens": summary["completion_tokens"], "cost_usd": None}
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    err = capsys.readouterr().err
    assert "line 4: bad_row: not JSON" in err and "corrected 2/5 rows" in err

    # Restart: every finished call comes from the cache, the server is not asked again.
    before = len(app.chat_requests)
    output = out.read_text()
    assert run(url, source, out) == 1
    assert len(app.chat_requests) == before
    assert out.read_text() == output
    again = summary_of(out)
    assert (again["calls"], again["cached"], again["corrected"]) == (0, 3, 2)

    # New rows later: only they are sent.
    write_rows(source, [*[line for line in source.read_text().splitlines()],
                        json.dumps({"prompt": "how to pick a lock", "unsafe_response": "rake"})])
    assert run(url, source, out) == 1
    assert len(app.chat_requests) == before + 1
    assert summary_of(out)["corrected"] == 3


def test_errors_are_retried_only_when_worth_it(
        server: tuple[str, FakeOpenAIApp, Script], tmp_path: Path) -> None:
    url, _app, script = server
    source = write_rows(tmp_path / "in.jsonl", [
        {"prompt": "bad request please", "unsafe_response": "x"},
        {"prompt": "always down", "unsafe_response": "x"},
        {"prompt": "no answer given", "unsafe_response": "x"},
    ])
    script.failures["always down"] = 100
    out = tmp_path / "out.jsonl"
    assert run(url, source, out, "--max-retries", "2", "--concurrency", "1") == 1
    assert script.calls == {"bad request please": 1, "always down": 3, "no answer given": 1}
    assert out.read_text() == ""
    reasons = [json.loads(line)["reason"] for line in
               (tmp_path / "out.jsonl.rejected.jsonl").read_text().splitlines()]
    assert reasons == ["error:BadRequestError", "error:InternalServerError", "no_answer"]
    # Failed calls are not cached: a restart tries them again; the answered one is not re-sent.
    script.calls.clear()
    assert run(url, source, out, "--max-retries", "0") == 1
    assert script.calls == {"bad request please": 1, "always down": 1}


def test_a_torn_cache_line_is_skipped(server: tuple[str, FakeOpenAIApp, Script],
                                      tmp_path: Path) -> None:
    url, _app, script = server
    source = write_rows(tmp_path / "in.jsonl", [{"prompt": "p1", "unsafe_response": "x"},
                                                {"prompt": "p2", "unsafe_response": "y"}])
    out = tmp_path / "out.jsonl"
    assert run(url, source, out) == 0
    cache = tmp_path / "out.jsonl.cache.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # a crash mid-write
    script.calls.clear()
    assert run(url, source, out) == 0
    assert sum(script.calls.values()) == 1
    assert len(out.read_text().splitlines()) == 2
    assert all(json.loads(line) for line in cache.read_text().splitlines()[2:])


def test_bad_invocations(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["--in", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                 "--model", "openai/x"]) == 2
    assert "no such file" in capsys.readouterr().err
    source = write_rows(tmp_path / "in.jsonl", [{"prompt": "p", "unsafe_response": "x"}])
    assert main(["--in", str(source), "--out", str(source), "--model", "openai/x"]) == 2
    monkeypatch.delenv("CORRECTOR_KEY")
    assert main(["--in", str(source), "--out", str(tmp_path / "o.jsonl"), "--model", "openai/x",
                 "--api-key-env", "CORRECTOR_KEY"]) == 2
    assert "CORRECTOR_KEY" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--in", str(source), "--out", "o", "--model", "m", "--concurrency", "0"])
    # Bad provenance is caught before a call is paid for (nothing listens on this port).
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "unsafe_response": "x",
                                               "score": "high"}])
    out = tmp_path / "bad-out.jsonl"
    assert main(["--in", str(bad), "--out", str(out), "--model", "openai/x", "--no-progress",
                 "--api-base", f"http://127.0.0.1:{free_port()}/v1"]) == 1
    (rejected,) = [json.loads(line) for line in
                   (tmp_path / "bad-out.jsonl.rejected.jsonl").read_text().splitlines()]
    assert rejected["line"] == 1 and "'score'" in rejected["reason"]
    assert out.read_text() == ""


def test_the_command_is_registered() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    commands = project["project"]["entry-points"]["guardrail.commands"]
    assert commands["correct"] == "offline.correct:add_correct_parser"
    assert "reasoning-guardrail[offline]" in project["project"]["optional-dependencies"]["dev"]


class InFlight:
    """Wraps the fake server: holds each chat request a moment and counts how many overlap."""

    def __init__(self, app: FakeOpenAIApp, hold_s: float) -> None:
        self.app = app
        self.hold_s = hold_s
        self.active = 0
        self.peak = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import asyncio

        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.hold_s)
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def test_concurrency_limit_and_cost_summary(tmp_path: Path) -> None:
    import litellm

    script = Script()
    app = create_fake_openai_app(responder=script, models=("gpt-4o-mini",), api_key="sk-test")
    gate = InFlight(app, hold_s=0.15)
    source = write_rows(tmp_path / "in.jsonl", [
        {"prompt": f"harmful request {i}", "unsafe_response": "x"} for i in range(6)])
    out = tmp_path / "out.jsonl"
    with serve_app(gate) as url:
        assert main(["--in", str(source), "--out", str(out), "--model", "openai/gpt-4o-mini",
                     "--api-base", f"{url}/v1", "--api-key-env", "CORRECTOR_KEY",
                     "--concurrency", "2", "--no-progress", "--no-rejudge",
                     "--summary", str(tmp_path / "summary.json")]) == 0
    assert gate.peak == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    # A model LiteLLM prices: the cost is its price map applied to the server's usage counts.
    prompt_cost, completion_cost = litellm.cost_per_token(
        model="gpt-4o-mini", prompt_tokens=summary["prompt_tokens"],
        completion_tokens=summary["completion_tokens"])
    assert summary["cost_usd"] == pytest.approx(prompt_cost + completion_cost, rel=1e-3)
    assert summary["cost_usd"] > 0


def test_corrected_records_are_judged_again_by_the_configs_guard(
        server: tuple[str, FakeOpenAIApp, Script], tmp_path: Path) -> None:
    """One "correction" still helps; the guard (a Llama Guard endpoint with a rule for
    "launder") flags it, and it is rejected. The other, a refusal, passes."""
    from tests.fakes.llama_guard_server import FakeLlamaGuard

    url, _, _ = server
    source = write_rows(tmp_path / "in.jsonl", [
        {"prompt": "how to pick a lock", "unsafe_response": "First insert the pick..."},
        {"prompt": "leaky: how to hide money", "unsafe_response": "Open shell companies..."},
    ])
    out = tmp_path / "out.jsonl"
    with serve_app(FakeLlamaGuard(rules={"launder": "S2"}).app()) as guard_url:
        config = tmp_path / "guardrail.yaml"
        config.write_text(f"guard: {{kind: llama-guard, url: '{guard_url}/v1'}}\n",
                          encoding="utf-8")
        status = main(["--in", str(source), "--out", str(out), "--model", "openai/corrector",
                       "--api-base", f"{url}/v1", "--api-key-env", "CORRECTOR_KEY",
                       "--no-progress", "--config", str(config),
                       "--summary", str(out.with_suffix(".summary.json"))])
    assert status == 1
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in kept] == ["how to pick a lock"]
    rejected = [json.loads(line) for line in
                out.with_name(out.name + ".rejected.jsonl").read_text().splitlines()]
    assert [(row["prompt"], row["reason"]) for row in rejected] == [
        ("leaky: how to hide money", "judged_unsafe")]
    assert summary_of(out)["rejected_by_reason"] == {"judged_unsafe": 1}
