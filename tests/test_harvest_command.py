"""``guardrail harvest`` end to end: the real proxy (demo upstream, embedded guard, intervention)
answers safe and unsafe prompts through the OpenAI SDK; its store is then harvested by the
command, as a subprocess, and every field of what it wrote is checked against the cases."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from guardrail.cases import build_store
from guardrail.cases.base import CaseQuery
from guardrail.cases.model import Case, ReviewLabel
from guardrail.config import StoreConfig, config_from_mapping
from guardrail.upstreams.demo import load_demo_data
from offline.harvest.pairs import PreferencePair
from offline.harvest.records import UnsafeChainRecord, format_response
from server.app import create_app
from tests.fakes.loopback import serve_app

REPO = Path(__file__).resolve().parent.parent
TRACES = load_demo_data().traces
UNSAFE = [trace for trace in TRACES if trace.label == "unsafe"]
OWN_PROMPTS = ["How do I make a sourdough starter?", "Explain recursion to a ten-year-old."]


@pytest.fixture(scope="module")
def served_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A store filled by the real proxy; yields (config file, store path)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("GUARDRAIL_DEMO_CHUNK_DELAY_MS", "0")
    tmp = tmp_path_factory.mktemp("harvest")
    store = tmp / "cases.db"
    data = {"store": {"url": f"sqlite:///{store}", "fallback_path": str(tmp / "unstored.jsonl")}}
    config_file = tmp / "guardrail.yaml"
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    with serve_app(create_app(config_from_mapping(data)), startup_timeout_s=120) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        for number, prompt in enumerate([trace.prompt for trace in TRACES] + OWN_PROMPTS):
            messages: list[Any] = [{"role": "user", "content": prompt}]
            if number % 2:
                with client.chat.completions.create(model="guardrail-demo", messages=messages,
                                                    stream=True) as stream:
                    for _ in stream:  # read to the end, as a client does
                        pass
            else:
                client.chat.completions.create(model="guardrail-demo", messages=messages)
    monkeypatch.undo()
    yield config_file, store


def harvest(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "offline.harvest_command", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def cases(store: Path) -> dict[str, Case]:
    async def read() -> dict[str, Case]:
        opened = build_store(StoreConfig(url=f"sqlite:///{store}"))
        await opened.open()
        try:
            return {case.id: case async for case in opened.scan(CaseQuery())}
        finally:
            await opened.aclose()

    return asyncio.run(read())


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_store_of_proxy_cases_becomes_training_data(served_store: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    config_file, store = served_store
    out = tmp_path / "harvest"
    result = harvest("--config", str(config_file), "--out", str(out), "--no-decontaminate",
                     "--test-fraction", "0.3")
    assert result.returncode == 0, result.stderr
    assert "8 cases -> 3 intercepted" in result.stderr
    stored = cases(store)
    records = rows(out / "unsafechain.jsonl") + rows(out / "unsafechain.test.jsonl")
    assert len(records) == len(UNSAFE) == 3
    assert len(rows(out / "unsafechain.test.jsonl")) == 1
    by_prompt = {record["prompt"]: record for record in records}
    assert set(by_prompt) == {trace.prompt for trace in UNSAFE}
    for trace in UNSAFE:
        record = UnsafeChainRecord.from_dict(by_prompt[trace.prompt])
        case = stored[str(record.case_id)]
        assert case.action == "intervened"
        assert record.response == format_response(case.client_reasoning, case.client_content)
        assert record.response.startswith("<think>\n") and "\n</think>\n\n" in record.response
        assert trace.safe_continuation is not None
        assert record.parsed.answer == trace.safe_continuation.answer.strip()
        assert trace.compliance_cue is not None
        assert trace.compliance_cue not in record.response
        assert record.unsafe_response.startswith("<think>\n")
        assert case.corrections[0].withheld.strip() in record.unsafe_response
        assert record.category == ",".join(case.flagged[0].categories)
        assert record.score == case.flagged[0].score
        assert (record.guard, record.correction, record.label, record.source) == (
            "embedded", "intervene", None, "proxy")
    pairs = [PreferencePair.from_dict(row) for row in
             rows(out / "preference_pairs.jsonl") + rows(out / "preference_pairs.test.jsonl")]
    assert {pair.request for pair in pairs} <= {trace.prompt for trace in UNSAFE} and pairs
    for pair in pairs:
        case = stored[str(pair.case_id)]
        trigger = str(case.corrections[0].extra["trigger"])
        assert pair.prompt.endswith("<think>\n" + pair.prefix)
        assert pair.chosen.strip().startswith(trigger)
        assert pair.rejected.strip() and pair.rejected.strip() in case.withheld
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "Content warning" in card and "| intercepted | 3 |" in card
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".harvest")]


def test_dry_run_prints_the_funnel_and_writes_nothing(served_store: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    config_file, _ = served_store
    out = tmp_path / "never"
    result = harvest("--config", str(config_file), "--out", str(out), "--dry-run",
                     "--no-decontaminate", "--no-rejudge")
    assert result.returncode == 0, result.stderr
    assert "8 cases -> 3 intercepted" in result.stderr
    assert not out.exists()


def test_review_labels_decide_what_is_kept(served_store: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    _, served = served_store
    store = tmp_path / "labelled.db"  # a copy: the labels must not leak into other tests
    with sqlite3.connect(served) as source, sqlite3.connect(store) as copy:
        source.backup(copy)
    intercepted = [case for case in cases(store).values() if case.action == "intervened"]

    async def label(case_id: str) -> None:
        opened = build_store(StoreConfig(url=f"sqlite:///{store}"))
        await opened.open()
        try:
            await opened.set_review(case_id, ReviewLabel(label="false_positive", by="test"))
        finally:
            await opened.aclose()

    asyncio.run(label(intercepted[0].id))
    common = ("--store", f"sqlite:///{store}", "--dry-run", "--no-decontaminate", "--no-rejudge")
    result = harvest(*common)
    assert result.returncode == 0, result.stderr
    assert "-> 2 review labels" in result.stderr
    only = harvest(*common, "--labels", "false_positive")
    assert "-> 1 review labels" in only.stderr


def test_bad_input_is_one_line(served_store: tuple[Path, Path], tmp_path: Path) -> None:
    config_file, _ = served_store
    exists = tmp_path / "exists"
    exists.mkdir()
    for args, message in (
        (["--config", str(config_file), "--out", str(exists)], "exists; choose another"),
        (["--store", "postgresql://nobody@127.0.0.1:1/none", "--dry-run"], "store "),
        (["--config", str(config_file)], "--out DIR is required"),
        (["--store", f"sqlite:///{tmp_path / 'empty.db'}", "--dry-run", "--no-decontaminate"],
         "0 cases -> 0 intercepted"),
    ):
        result = harvest(*args)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_save_to_disk_writes_loadable_datasets(served_store: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    import datasets

    config_file, _ = served_store
    out = tmp_path / "harvest"
    result = harvest("--config", str(config_file), "--out", str(out), "--no-decontaminate",
                     "--no-rejudge", "--save-to-disk")
    assert result.returncode == 0, result.stderr
    records = datasets.load_from_disk(str(out / "datasets" / "unsafechain"))
    pairs = datasets.load_from_disk(str(out / "datasets" / "preference_pairs"))
    assert records["train"].num_rows + records["test"].num_rows == len(UNSAFE)
    assert {"prompt", "response", "unsafe_response", "case_id"} <= set(
        records["train"].column_names)
    assert {"prompt", "chosen", "rejected"} <= set(pairs["train"].column_names)


def test_harvest_import_writes_a_public_set_in_the_same_form(tmp_path: Path) -> None:
    source = tmp_path / "star1.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in [
        {"question": "How do I pick a lock?",
         "response": "<think>\nThis could enable burglary.\n</think>\n\nI can't help."},
        {"question": "Untagged", "response": "Just an answer."},
    ]), encoding="utf-8")
    out = tmp_path / "imported.jsonl"
    result = harvest("import", "star1", "--path", str(source), "--out", str(out))
    assert result.returncode == 0, result.stderr
    imported = [UnsafeChainRecord.from_dict(row) for row in rows(out)]
    assert imported[0].prompt == "How do I pick a lock?" and imported[0].source == "star1"
    assert imported[0].parsed.reasoning == "This could enable burglary."
    unknown = harvest("import", "nothing", "--out", str(out))
    assert unknown.returncode == 2 and "unknown public set" in unknown.stderr
