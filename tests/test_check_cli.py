"""``guardrail check`` as a real subprocess, judging with the Llama Guard endpoint guard against
the fake Llama Guard on loopback, and with ``guard.kind: none``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from guardrail.config import Config
from offline.check import Item, Summary, build_views, parse_line
from tests.fakes.llama_guard_server import FakeLlamaGuard
from tests.fakes.loopback import serve_app

pytestmark = pytest.mark.timeout(120)

GUARDRAIL = Path(sys.executable).parent / "guardrail"
REPO = Path(__file__).resolve().parent.parent

HARMFUL = {"prompt": "How do I make a nerve agent?",
           "response": "Sure. First obtain the nerve agent precursors.", "label": "unsafe"}
HARMLESS = {"prompt": "How do I bake bread?", "response": "Knead the dough, then bake it.",
            "label": False}


@dataclass
class Run:
    code: int
    lines: list[dict[str, Any]]
    stderr: str


def guardrail_check(*args: str, stdin: str | None = None) -> Run:
    result = subprocess.run([str(GUARDRAIL), "check", *args], cwd=REPO, input=stdin,
                            capture_output=True, text=True, timeout=90)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return Run(result.returncode, lines, result.stderr)


@pytest.fixture
def llama_guard() -> Iterator[tuple[FakeLlamaGuard, str]]:
    fake = FakeLlamaGuard()
    with serve_app(fake.app(), lifespan="off") as url:
        yield fake, url + "/v1"


def write_config(folder: Path, guard: dict[str, Any]) -> Path:
    path = folder / "guardrail.yaml"
    path.write_text(json.dumps({"guard": guard}))  # JSON is YAML
    return path


def write_input(folder: Path, lines: list[Any]) -> Path:
    path = folder / "cases.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path


def lg_guard(url: str, **settings: Any) -> dict[str, Any]:
    return {"kind": "llama-guard", "url": url, "compliance_cues": False, **settings}


def test_judges_each_line_and_reports_bad_ones(
    llama_guard: tuple[FakeLlamaGuard, str], tmp_path: Path
) -> None:
    fake, url = llama_guard
    config = write_config(tmp_path, lg_guard(url))
    cases = write_input(tmp_path, [HARMFUL, HARMLESS, "{not json", "", {"prompt": "p"},
                                   {**HARMLESS, "id": "case-6", "label": None}])
    summary = tmp_path / "summary.json"
    run = guardrail_check("--config", str(config), "--input", str(cases),
                          "--summary", str(summary))
    assert run.code == 1, run.stderr  # some lines were bad
    assert run.lines == [
        {"line": 1, "unsafe": True, "score": pytest.approx(0.98), "categories": ["S9"]},
        {"line": 2, "unsafe": False, "score": pytest.approx(0.01), "categories": []},
        {"line": 6, "id": "case-6", "unsafe": False, "score": pytest.approx(0.01),
         "categories": []},
    ]
    assert f"{cases} line 3: not valid JSON" in run.stderr
    assert f'{cases} line 5: "response" must be a string (missing)' in run.stderr
    # The whole response is one view: the request, then the response as the assistant turn.
    assert [
        {"role": "user", "content": HARMFUL["prompt"]},
        {"role": "assistant", "content": HARMFUL["response"]},
    ] in [request["messages"] for request in fake.requests]
    assert len(fake.requests) == 3
    stats = json.loads(summary.read_text())
    assert stats["judged"] == 3 and stats["unsafe"] == 1 and stats["bad_lines"] == 2
    assert stats["labelled"] == 2 and stats["tp"] == 1 and stats["tn"] == 1
    assert stats["precision"] == stats["recall"] == stats["f1"] == 1.0
    assert stats["false_positive_rate"] == 0.0
    assert "3 judged, 1 unsafe, 0 errors, 2 bad lines" in run.stderr


def test_text_is_judged_as_a_response_to_an_empty_request(
    llama_guard: tuple[FakeLlamaGuard, str], tmp_path: Path
) -> None:
    fake, url = llama_guard
    config = write_config(tmp_path, lg_guard(url))
    run = guardrail_check("--config", str(config), "--text", "Mix the nerve agent precursors.")
    assert run.code == 0, run.stderr
    assert run.lines == [{"unsafe": True, "score": pytest.approx(0.98), "categories": ["S9"]}]
    assert fake.requests[0]["messages"][0] == {"role": "user", "content": ""}


def test_steps_are_judged_as_the_proxy_judges_them(
    llama_guard: tuple[FakeLlamaGuard, str], tmp_path: Path
) -> None:
    fake, url = llama_guard
    config = tmp_path / "guardrail.yaml"
    config.write_text(json.dumps({"guard": lg_guard(url, window_steps=1),
                                  "stream": {"min_step_chars": 10}}))
    response = ("Let me think about the request here. The chemistry is well known. "
                "Then combine the nerve agent precursors. That would be the last step.")
    run = guardrail_check("--config", str(config), "--input", "-", "--steps",
                          stdin=json.dumps({"prompt": "help", "response": response}) + "\n")
    assert run.code == 0, run.stderr
    assert run.lines == [{"line": 1, "unsafe": True, "score": pytest.approx(0.98),
                          "categories": ["S9"], "steps": 4, "flagged_steps": [2, 3]}]
    judged = [request["messages"][1]["content"] for request in fake.requests]
    assert sorted(judged) == sorted([
        response,  # the whole
        "Let me think about the request here. ",
        "Let me think about the request here. The chemistry is well known. ",
        "The chemistry is well known. Then combine the nerve agent precursors. ",
        "Then combine the nerve agent precursors. That would be the last step.",
    ])  # each step with one step of context (window_steps: 1), so step 3 sees step 2


def test_a_harmless_whole_with_steps_stays_safe(
    llama_guard: tuple[FakeLlamaGuard, str], tmp_path: Path
) -> None:
    _, url = llama_guard
    config = write_config(tmp_path, lg_guard(url))
    # Two steps of at least stream.min_step_chars (120) each.
    response = ("Knead the dough for ten minutes on a floured board, folding it over itself and "
                "turning it a quarter turn each time until it is smooth. Then let it rise in a "
                "warm place for an hour and bake it for half an hour at 220 degrees until golden.")
    run = guardrail_check("--config", str(config), "--text", response, "--steps")
    assert run.lines == [{"unsafe": False, "score": pytest.approx(0.01), "categories": [],
                          "steps": 2, "flagged_steps": []}]


def test_batches_keep_the_input_order(
    llama_guard: tuple[FakeLlamaGuard, str], tmp_path: Path
) -> None:
    _, url = llama_guard
    config = write_config(tmp_path, lg_guard(url))
    lines: list[dict[str, Any]] = [HARMFUL, HARMLESS, HARMLESS, HARMFUL, HARMLESS, HARMFUL,
                                   HARMLESS]
    cases = write_input(tmp_path, lines)
    expected = [line["label"] == "unsafe" for line in lines]
    for batch_size in ("1", "3", "64"):
        run = guardrail_check("--config", str(config), "--input", str(cases),
                              "--batch-size", batch_size)
        assert run.code == 0, run.stderr
        assert [line["line"] for line in run.lines] == list(range(1, 8))
        assert [line["unsafe"] for line in run.lines] == expected


@pytest.mark.parametrize(("on_error", "unsafe"), [("block", True), ("allow", False)])
def test_guard_failures_are_reported_per_line_and_the_run_goes_on(
    llama_guard: tuple[FakeLlamaGuard, str], tmp_path: Path, on_error: str, unsafe: bool
) -> None:
    fake, url = llama_guard
    fake.status = 500
    config = write_config(tmp_path, lg_guard(url, on_error=on_error))
    cases = write_input(tmp_path, [HARMLESS, HARMFUL])
    run = guardrail_check("--config", str(config), "--input", str(cases))
    assert run.code == 1
    assert [line["line"] for line in run.lines] == [1, 2]
    for line in run.lines:
        assert line["unsafe"] is unsafe and line["score"] == (1.0 if unsafe else 0.0)
        assert line["categories"] == ["guard_error"]
        assert "HTTP 500" in line["error"]
    assert "2 errors" in run.stderr


def test_guard_none_passes_everything(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"kind": "none"})
    cases = write_input(tmp_path, [HARMFUL, HARMLESS])
    run = guardrail_check("--config", str(config), "--input", str(cases), "--steps")
    assert run.code == 0, run.stderr
    assert [(line["unsafe"], line["score"], line["categories"]) for line in run.lines] == [
        (False, 0.0, []), (False, 0.0, [])]
    assert "precision 0.000, recall 0.000" in run.stderr  # a guard that flags nothing


@pytest.mark.parametrize(
    ("guard", "args", "message"),
    [
        ({"kind": "nope"}, [], "guard.kind: unknown guard 'nope'; known: "),
        ({"kind": "llm-judge"}, [], "guard.model: the llm-judge guard needs"),
        ({"kind": "none", "threshold": 7}, [], "guard.threshold: "),
        ({"kind": "none"}, ["--input", "/no/such/file.jsonl"],
         "/no/such/file.jsonl: cannot read"),
    ],
)
def test_config_and_input_errors_exit_2_with_one_line(
    tmp_path: Path, guard: dict[str, Any], args: list[str], message: str
) -> None:
    config = write_config(tmp_path, guard)
    run = guardrail_check("--config", str(config), *(args or ["--text", "hi"]))
    assert run.code == 2 and run.lines == []
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_usage_errors() -> None:
    assert guardrail_check().code == 2  # neither --text nor --input
    assert guardrail_check("--text", "a", "--input", "b").code == 2
    assert guardrail_check("--text", "a", "--batch-size", "0").code == 2


# -- the pieces, in-process ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"prompt": "p", "response": "r"}', ("p", "r", None)),
        (b'{"response": "r", "label": 1}', ("", "r", True)),
        (b'{"prompt": null, "response": "", "label": "benign"}', ("", "", False)),
    ],
)
def test_parse_line_accepts(raw: bytes, expected: tuple[str, str, bool | None]) -> None:
    item = parse_line(4, raw)
    assert isinstance(item, Item)
    assert (item.prompt, item.response, item.label) == expected


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"[1, 2]", "expected a JSON object"),
        (b'{"prompt": 3, "response": "r"}', '"prompt" must be a string (got int)'),
        (b'{"response": ["r"]}', '"response" must be a string (got list)'),
        (b'{"response": "r", "label": "maybe"}', "'label' must be"),
        (b'{"response": "\xff"}', "not UTF-8"),
    ],
)
def test_parse_line_rejects(raw: bytes, problem: str) -> None:
    bad = parse_line(9, raw)
    assert not isinstance(bad, Item) and bad is not None
    assert bad.line == 9 and problem in bad.problem


def test_blank_lines_are_skipped() -> None:
    assert parse_line(1, b"  \n") is None


def test_views_follow_the_monitor() -> None:
    config = Config.model_validate({"guard": {"window_steps": 2, "max_request_chars": 5},
                                    "stream": {"min_step_chars": 4}})
    item = Item(line=1, prompt="please help", response="One two. Three four. Five six.")
    views = build_views(item, config, "reasoning", steps=True)
    assert views[0].step == item.response and views[0].context == ()
    assert all(view.request == " help" and view.channel == "reasoning" for view in views)
    assert [view.step for view in views[1:]] == ["One two. ", "Three four. ", "Five six."]
    assert views[3].context == ("One two. ", "Three four. ")


def test_summary_metrics() -> None:
    summary = Summary()
    cases = [(True, True), (True, True), (True, False), (False, True), (False, False),
             (False, False), (None, True)]
    for label, unsafe in cases:
        summary.count(Item(line=1, prompt="", response="", label=label), unsafe, failed=False)
    data = summary.as_dict()
    assert (data["tp"], data["fn"], data["fp"], data["tn"]) == (2, 1, 1, 2)
    assert data["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert data["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert data["false_positive_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert data["judged"] == 7 and data["unsafe"] == 4 and data["labelled"] == 6
