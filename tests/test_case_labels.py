"""Review labels through the running proxy's admin API and through ``guardrail cases`` (run as a
real subprocess), the Label Studio round trip, and the replay of the fallback file."""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ElementTree
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from guardrail.cases import Case, build_store
from guardrail.cases.base import CaseQuery
from guardrail.cases.model import SCHEMA_VERSION, ReviewLabel
from guardrail.config import StoreConfig
from offline.label_studio import LABEL_CONFIG, LABEL_CONTROL, NOTE_CONTROL, TEXT_OBJECT
from tests.fakes.openai_server import FakeReply, create_fake_openai_app
from tests.proxy_harness import running_proxy
from tests.test_auth_admin import (
    ADMIN_KEY,
    CLIENT_KEY,
    SAFE_REPLY,
    assert_error,
    bearer,
    chat_body,
    reply_for,
)

ROOT = Path(__file__).resolve().parents[1]
SECOND_ADMIN_KEY = "sk-admin-second-4d1e"
BASE = 1_716_200_000.0


# -- helpers ----------------------------------------------------------------------------------

def cases_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``guardrail cases ARGV`` in a fresh interpreter (the module's own entry)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "offline.cases_command", *argv], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int,
                          *fragments: str) -> None:
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("guardrail cases: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def make_case(number: int, *, action: str = "intervened", status: str = "complete",
              review: ReviewLabel | None = None, **fields: Any) -> Case:
    return Case.model_validate({
        "id": f"case_{number:04d}", "created_at": BASE + number, "model": "m-a",
        "guard": "llama-guard", "action": action, "status": status, "review": review,
        "request": {"messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": f"prompt {number}"}]},
        "client_reasoning": f"reasoning {number}", "withheld": f"withheld {number}",
        "client_content": f"answer {number}", "finish_reason": "stop",
        "flagged": [{"step": 1, "categories": ["S2"], "score": 0.9}],
        "corrections": [{"round": 1, "strategy": "intervene", "inserted": "Wait, no. ",
                         "continuation": f"safe continuation {number}"}],
        **fields,
    })


def seed(url: str, cases: list[Case]) -> None:
    async def put() -> None:
        store = build_store(StoreConfig(url=url))
        await store.open()
        try:
            for case in cases:
                await store.put(case)
        finally:
            await store.aclose()

    asyncio.run(put())


def stored(url: str, query: CaseQuery | None = None) -> dict[str, Case]:
    async def read() -> dict[str, Case]:
        store = build_store(StoreConfig(url=url))
        await store.open()
        try:
            return {case.id: case async for case in store.scan(query or CaseQuery())}
        finally:
            await store.aclose()

    return asyncio.run(read())


# -- the admin API ----------------------------------------------------------------------------

def test_label_through_the_api_records_the_key_name_never_the_key(tmp_path: Path) -> None:
    overrides = {"server": {"api_keys": [CLIENT_KEY],
                            "admin_keys": {"ops-alice": ADMIN_KEY, "ops-bob": SECOND_ADMIN_KEY}}}
    upstream = create_fake_openai_app(responder=reply_for)
    with running_proxy(tmp_path, upstream_app=upstream, overrides=overrides) as proxy:
        chat = proxy.client.post("/v1/chat/completions", headers=bearer(CLIENT_KEY),
                                 json=chat_body("how do I make sarin at home"))
        assert chat.status_code == 200, chat.text
        case_id = chat.headers["x-guardrail-case-id"]
        path = f"/admin/cases/{case_id}/label"
        # The proxy writes this version's schema, without a review until someone sets one.
        assert proxy.case(case_id)["schema_version"] == SCHEMA_VERSION
        assert proxy.case(case_id)["review"] is None

        before = time.time()
        response = proxy.client.post(path, headers=bearer(ADMIN_KEY),
                                     json={"label": "confirmed", "note": "real nerve agent ask"})
        assert response.status_code == 200, response.text
        review = response.json()["review"]
        assert review["label"] == "confirmed" and review["by"] == "ops-alice"
        assert review["note"] == "real nerve agent ask"
        assert before - 1 <= review["at"] <= time.time() + 1
        assert response.json()["action"] == "refused"
        # Stored with the case: the admin read and the store's label filter both see it.
        assert proxy.case(case_id)["review"] == review
        assert list(stored(proxy.config.store.url, CaseQuery(labels=("confirmed",)))) == [
            case_id]

        # A second key relabels it; its name, not the first's, is recorded.
        again = proxy.client.post(path, headers=bearer(SECOND_ADMIN_KEY),
                                  json={"label": "bad_correction"})
        assert again.status_code == 200, again.text
        assert again.json()["review"]["by"] == "ops-bob"
        assert again.json()["review"]["note"] is None
        # A named admin key still works on the client routes, as a listed one does.
        assert proxy.client.get("/v1/models", headers=bearer(SECOND_ADMIN_KEY)).status_code == 200

    # No key ever reaches the database file.
    data = b"".join(path.read_bytes() for path in tmp_path.glob("cases.db*"))
    assert b"ops-bob" in data
    assert ADMIN_KEY.encode() not in data and SECOND_ADMIN_KEY.encode() not in data


def test_label_api_errors_are_openai_shaped(tmp_path: Path) -> None:
    overrides = {"server": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]}}
    with running_proxy(tmp_path, SAFE_REPLY, guard="none", overrides=overrides) as proxy:
        chat = proxy.client.post("/v1/chat/completions", json=chat_body(),
                                 headers=bearer(CLIENT_KEY))
        case_id = chat.headers["x-guardrail-case-id"]
        path = f"/admin/cases/{case_id}/label"
        admin = bearer(ADMIN_KEY)

        # The key is checked before the body is looked at.
        assert_error(proxy.client.post(path, json={"label": "nope"}), 401,
                     "authentication_error")
        assert_error(proxy.client.post(path, json={"label": "confirmed"},
                                       headers=bearer(CLIENT_KEY)), 403, "permission_error")

        unknown = proxy.client.post("/admin/cases/case_missing/label", headers=admin,
                                    json={"label": "confirmed"})
        assert assert_error(unknown, 404, "not_found_error")["param"] == "case_id"
        for body in ({"label": "maybe"}, {}, {"label": None}, {"label": ["confirmed"]},
                     {"label": "confirmed", "extra": 1},
                     {"label": "confirmed", "note": "x" * 5000}, {"label": "confirmed",
                                                                  "note": 5}):
            error = assert_error(proxy.client.post(path, headers=admin, json=body), 400,
                                 "invalid_request_error")
            assert error["param"] in ("label", "note", "extra", None), error
        bad_label = assert_error(proxy.client.post(path, headers=admin, json={"label": "maybe"}),
                                 400, "invalid_request_error")
        assert bad_label["param"] == "label" and "confirmed" in bad_label["message"]
        not_json = proxy.client.post(path, headers={**admin, "content-type": "application/json"},
                                     content=b"{label")
        assert_error(not_json, 400, "invalid_request_error")
        assert proxy.case(case_id)["review"] is None  # nothing was stored by a bad request

        # Plain-string admin keys are named by their position.
        ok = proxy.client.post(path, headers=admin, json={"label": "false_positive"})
        assert ok.status_code == 200 and ok.json()["review"]["by"] == "admin-key-1"


def test_with_auth_off_the_label_author_is_anonymous(tmp_path: Path) -> None:
    with running_proxy(tmp_path, SAFE_REPLY, guard="none") as proxy:
        case_id = proxy.chat().headers["x-guardrail-case-id"]
        response = proxy.client.post(f"/admin/cases/{case_id}/label",
                                     json={"label": "false_positive", "note": "greeting"})
        assert response.status_code == 200, response.text
        assert response.json()["review"]["by"] == "anonymous"


def test_admin_key_names_in_the_config() -> None:
    from guardrail.config import config_from_mapping
    from guardrail.errors import ConfigError

    listed = config_from_mapping({"server": {"admin_keys": ["k1", "k2"]}}).server
    assert listed.named_admin_keys() == [("admin-key-1", "k1"), ("admin-key-2", "k2")]
    named = config_from_mapping({"server": {"admin_keys": {"ops": "k1"}}}).server
    assert named.named_admin_keys() == [("ops", "k1")]
    for bad in ({"": "k1"}, {"ops": ""}, [""]):
        with pytest.raises(ConfigError, match="admin"):
            config_from_mapping({"server": {"admin_keys": bad}})


# -- the command ------------------------------------------------------------------------------

def test_the_entry_point_is_declared() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    commands = pyproject["project"]["entry-points"]["guardrail.commands"]
    assert commands["cases"] == "offline.cases_command:add_cases_parser"
    # And it registers under the guardrail frame as the frame expects.
    import argparse

    from offline.cases_command import add_cases_parser

    parser = argparse.ArgumentParser(prog="guardrail")
    add_cases_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cases", "label", "case_1", "--label", "confirmed"])
    assert callable(args.handler) and args.case_id == "case_1"


def test_label_through_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cases.db"
    seed(url, [make_case(1), make_case(2)])
    result = cases_cli("label", "case_0001", "--label", "bad_correction", "--note",
                       "trigger came too late", "--store", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "case_0001 labelled bad_correction" in result.stdout
    review = stored(url)["case_0001"].review
    assert review is not None and review.label == "bad_correction"
    assert review.by == f"cli:{getpass.getuser()}" and review.note == "trigger came too late"
    assert abs(review.at - time.time()) < 60
    assert stored(url)["case_0002"].review is None

    # The config's store is the default.
    config = tmp_path / "guardrail.yaml"
    config.write_text(f"store:\n  url: {url}\n")
    result = cases_cli("label", "case_0002", "--label", "confirmed", "--config", str(config),
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert stored(url)["case_0002"].review is not None

    unknown = cases_cli("label", "case_9999", "--label", "confirmed", "--store", url,
                        cwd=tmp_path)
    assert_one_line_error(unknown, 1, "no case with id 'case_9999'")


def test_the_cli_fails_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "cases.db"
    result = cases_cli("export", "--format", "jsonl", "--store", f"sqlite:///{missing}",
                       cwd=tmp_path)
    assert_one_line_error(result, 2, "no case store at", str(missing))
    assert not missing.parent.exists(), "a read-only command created a database"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = cases_cli("label", "c", "--label", "confirmed", "--store",
                       f"postgresql://u:pa55word@127.0.0.1:{port}/cases", cwd=tmp_path)
    assert_one_line_error(result, 2, f"127.0.0.1:{port}/cases", "open failed")
    assert "pa55word" not in result.stderr

    result = cases_cli("export", "--format", "jsonl", "--store", "mysql://x", cwd=tmp_path)
    assert_one_line_error(result, 2, "config error")
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("store: [1, 2\n")
    result = cases_cli("replay", "--config", str(bad_config), cwd=tmp_path)
    assert_one_line_error(result, 2, "config error")


def test_export_jsonl_with_filters(tmp_path: Path, store_url: str) -> None:
    cases = [make_case(1, action="pass"), make_case(2),
             make_case(3, action="refused", review=ReviewLabel(label="confirmed", by="x")),
             make_case(4, model="m-b")]
    seed(store_url, cases)
    out = tmp_path / "cases.jsonl"

    def export(*filters: str) -> list[str]:
        result = cases_cli("export", "--format", "jsonl", "--out", str(out), "--store",
                           store_url, *filters, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        lines = out.read_text().splitlines()
        assert f"{len(lines)} case(s) exported" in result.stderr
        return [Case.model_validate_json(line).id for line in lines]

    everything = [Case.model_validate_json(line) for line in (
        out.read_text().splitlines() if export() else [])]
    assert [case.model_dump() for case in everything] == [case.model_dump() for case in cases]
    assert export("--since", "2024-05-20T10:13:22Z") == ["case_0002", "case_0003", "case_0004"]
    assert export("--since", str(BASE + 2), "--until", str(BASE + 4)) == [
        "case_0002", "case_0003"]
    assert export("--actions", "refused,pass") == ["case_0001", "case_0003"]
    assert export("--labels", "none") == ["case_0001", "case_0002", "case_0004"]
    assert export("--labels", "confirmed") == ["case_0003"]
    assert export("--model", "m-b") == ["case_0004"]
    assert export("--since", "2030-01-01") == []
    assert not list(tmp_path.glob(".cases.jsonl.*")), "a temporary file was left behind"

    bad = cases_cli("export", "--format", "jsonl", "--labels", "maybe", "--store", store_url,
                    cwd=tmp_path)
    assert bad.returncode == 2 and "unknown label 'maybe'" in bad.stderr
    bad = cases_cli("export", "--format", "jsonl", "--since", "yesterday", "--store",
                    store_url, cwd=tmp_path)
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


def test_exporting_an_empty_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cases.db"
    seed(url, [])
    result = cases_cli("export", "--format", "label-studio", "--store", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert "0 case(s) exported" in result.stderr


# -- Label Studio -----------------------------------------------------------------------------

def annotate(task: dict[str, Any], label: str, *, user: Any = 10, note: str | None = None,
             at: str = "2026-11-29T10:00:00.000000Z", cancelled: bool = False) -> None:
    """What Label Studio adds to a task when a reviewer submits (its export's shape)."""
    result: list[dict[str, Any]] = [{
        "id": "r1", "from_name": LABEL_CONTROL, "to_name": TEXT_OBJECT, "type": "choices",
        "origin": "manual", "value": {"choices": [label]}}]
    if note is not None:
        result.append({"id": "r2", "from_name": NOTE_CONTROL, "to_name": TEXT_OBJECT,
                       "type": "textarea", "origin": "manual", "value": {"text": [note]}})
    task.setdefault("annotations", []).append({
        "id": len(task.get("annotations", [])) + 1, "completed_by": user, "result": result,
        "was_cancelled": cancelled, "ground_truth": False, "created_at": at, "updated_at": at,
        "lead_time": 12.5, "task": task.get("id", 1), "project": 3})


def test_label_studio_round_trip(tmp_path: Path, store_url: str) -> None:
    earlier = ReviewLabel(label="confirmed", by="admin-key-1", at=BASE, note="first look")
    seed(store_url, [make_case(1), make_case(2), make_case(3, review=earlier), make_case(4),
                     make_case(5)])
    tasks_file, config_file = tmp_path / "tasks.json", tmp_path / "config.xml"
    result = cases_cli("export", "--format", "label-studio", "--out", str(tasks_file),
                       "--label-config", str(config_file), "--store", store_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tasks = json.loads(tasks_file.read_text())
    assert [task["data"]["case_id"] for task in tasks] == [f"case_000{n}" for n in range(1, 6)]
    first = tasks[0]["data"]
    assert first["prompt"] == "prompt 1" and first["reasoning"] == "reasoning 1"
    assert first["withheld"] == "withheld 1" and first["answer"] == "answer 1"
    assert "Wait, no. safe continuation 1" in first["correction"]
    assert first["categories"] == ["S2"] and first["action"] == "intervened"
    assert "annotations" not in tasks[0]
    # The case labelled here goes out with its label, so the reviewer sees it.
    (out_annotation,) = tasks[2]["annotations"]
    assert out_annotation["result"][0]["value"] == {"choices": ["confirmed"]}
    assert out_annotation["result"][1]["value"] == {"text": ["first look"]}

    # The labelling interface written beside them names what the tasks carry.
    view = ElementTree.fromstring(config_file.read_text())
    assert config_file.read_text() == LABEL_CONFIG
    variables = {element.get("value", "")[1:] for element in view.iter("Text")}
    assert variables <= set(first)
    choices = next(view.iter("Choices"))
    assert choices.get("name") == LABEL_CONTROL and choices.get("toName") == TEXT_OBJECT
    assert {choice.get("value") for choice in choices.iter("Choice")} == {
        "confirmed", "false_positive", "bad_correction"}

    # Reviewers work in Label Studio; its export comes back with ids and annotations added.
    for number, task in enumerate(tasks, start=1):
        task.update(id=100 + number, project=3)
    annotate(tasks[0], "false_positive", note="just chemistry homework")
    annotate(tasks[1], "confirmed", at="2026-11-29T09:00:00Z")
    annotate(tasks[1], "bad_correction", user={"id": 11, "email": "rev@example.org"},
             at="2026-11-29T11:00:00Z")  # the later one wins
    annotate(tasks[1], "confirmed", at="2026-11-29T12:00:00Z", cancelled=True)  # skipped
    annotate(tasks[3], "false_positive", cancelled=True)  # only a skipped one: unlabelled
    tasks_file.write_text(json.dumps(tasks))

    result = cases_cli("import", str(tasks_file), "--store", store_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("2 labelled, 1 unchanged, 2 task(s) without a label yet, 0 unknown case id(s), "
            "0 bad task(s)") in result.stdout
    cases = stored(store_url)
    one, two = cases["case_0001"].review, cases["case_0002"].review
    assert one is not None and two is not None
    assert (one.label, one.by, one.note) == ("false_positive", "label-studio:user-10",
                                             "just chemistry homework")
    assert one.at == dt.datetime(2026, 11, 29, 10, tzinfo=dt.UTC).timestamp()
    assert (two.label, two.by, two.note) == ("bad_correction", "label-studio:rev@example.org",
                                             None)
    assert cases["case_0003"].review == earlier  # unchanged: who and when kept
    assert cases["case_0004"].review is None and cases["case_0005"].review is None

    # Importing the same file again changes nothing.
    result = cases_cli("import", str(tasks_file), "--store", store_url, cwd=tmp_path)
    assert "0 labelled, 3 unchanged" in result.stdout
    assert stored(store_url)["case_0001"].review == one


def test_label_studio_json_min_and_bad_tasks(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cases.db"
    seed(url, [make_case(1), make_case(2)])
    export = [
        {"id": 7, "case_id": "case_0001", "prompt": "prompt 1", "label": "Bad correction",
         "note": "rambles", "annotator": "rev@example.org", "annotation_id": 3,
         "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z",
         "lead_time": 3.1},
        {"id": 8, "case_id": "case_0002", "label": {"choices": ["confirmed"]}, "annotator": 4},
        {"id": 9, "case_id": "case_0003", "label": "confirmed"},  # not in this store
        {"id": 10, "case_id": "case_0002", "label": "maybe"},
        {"id": 11, "prompt": "made elsewhere", "label": "confirmed"},
        "not a task",
        {"id": 12, "case_id": "case_0001"},
    ]
    path = tmp_path / "min.json"
    path.write_text(json.dumps(export))
    result = cases_cli("import", str(path), "--store", url, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert ("2 labelled, 0 unchanged, 1 task(s) without a label yet, 1 unknown case id(s), "
            "3 bad task(s)") in result.stdout
    assert "no case with id 'case_0003'" in result.stderr
    assert "'maybe'" in result.stderr and "not a task exported from here" in result.stderr
    assert "Traceback" not in result.stderr
    cases = stored(url)
    one, two = cases["case_0001"].review, cases["case_0002"].review
    assert one is not None and (one.label, one.by, one.note) == (
        "bad_correction", "label-studio:rev@example.org", "rambles")
    assert two is not None and (two.label, two.by) == ("confirmed", "label-studio:user-4")

    path.write_text("[{not json")
    assert_one_line_error(cases_cli("import", str(path), "--store", url, cwd=tmp_path), 2,
                          "not a JSON export")
    assert_one_line_error(cases_cli("import", str(tmp_path / "none.json"), "--store", url,
                                    cwd=tmp_path), 2, "cannot read")


# -- replay -----------------------------------------------------------------------------------

def test_replay_never_downgrades(tmp_path: Path, store_url: str) -> None:
    done = make_case(3, action="refused")
    seed(store_url, [done])
    busy_a = make_case(1, status="in_progress", action="pass", client_content="")
    done_a = make_case(1)
    only_b = make_case(2, status="in_progress")
    stale_c = done.model_copy(update={"status": "in_progress", "action": "pass"})
    future = json.loads(make_case(4).model_dump_json()) | {"schema_version": 99}
    fallback = tmp_path / "unstored.jsonl"
    fallback.write_text("\n".join([
        busy_a.model_dump_json(), done_a.model_dump_json(), only_b.model_dump_json(),
        stale_c.model_dump_json(), json.dumps(future), "", done_a.model_dump_json()[:50],
    ]) + "\n")

    result = cases_cli("replay", "--file", str(fallback), "--store", store_url, cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # some lines could not be read
    assert ("3 replayed, 1 skipped as older than the stored record, 2 unreadable line(s)"
            in result.stdout)
    assert "line 5 is not a case" in result.stderr and "schema_version 99" in result.stderr
    assert "line 7 is not a case" in result.stderr and "Traceback" not in result.stderr
    cases = stored(store_url)
    assert cases["case_0001"].model_dump() == done_a.model_dump()
    assert cases["case_0002"].model_dump() == only_b.model_dump()
    assert cases["case_0003"].model_dump() == done.model_dump()  # not downgraded
    assert "case_0004" not in cases

    # Replaying again changes nothing: the in-progress copy of case 1 is now the older one.
    again = cases_cli("replay", "--file", str(fallback), "--store", store_url, cwd=tmp_path)
    assert "2 replayed, 2 skipped as older" in again.stdout
    assert stored(store_url) == cases


def test_replay_reads_the_config_and_an_absent_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cases.db"
    fallback = tmp_path / "kept.jsonl"
    config = tmp_path / "guardrail.yaml"
    config.write_text(f"store:\n  url: {url}\n  fallback_path: {fallback}\n")
    result = cases_cli("replay", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0 and "nothing to replay" in result.stdout
    fallback.write_text(make_case(1).model_dump_json() + "\n")
    result = cases_cli("replay", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 replayed" in result.stdout and list(stored(url)) == ["case_0001"]


def test_a_case_the_store_refused_is_replayed_from_the_proxys_fallback(tmp_path: Path) -> None:
    """End to end: the store is unusable while the proxy serves, the case goes to the fallback
    file; once the store is back, replay puts it where a harvest reads it."""
    with running_proxy(tmp_path, FakeReply(reasoning="Fine.", answer="Hi."),
                       guard="none") as proxy:
        # The table disappears under the running proxy (a botched migration, an operator's
        # mistake): every put fails at once.
        with closing(sqlite3.connect(proxy.store_path)) as connection:
            connection.execute("DROP TABLE cases")
        response = proxy.chat("hello there")
        assert response.status_code == 200
        case_id = response.headers["x-guardrail-case-id"]
    fallback = tmp_path / "unstored.jsonl"
    assert case_id in fallback.read_text()
    url = f"sqlite:///{tmp_path}/restored.db"
    result = cases_cli("replay", "--file", str(fallback), "--store", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    case = stored(url)[case_id]
    assert case.status == "complete" and case.client_content == "Hi."
