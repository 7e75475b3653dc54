"""The cycle's stage cache and its config, in process: when a stage is skipped, rerun, resumed
in its kept work folder, or refused as incomplete; and bad configs as one line each."""

from __future__ import annotations

import argparse
import json
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
import yaml

from offline.cycle.command import main, run
from offline.cycle.fingerprint import path_fingerprint, store_fingerprint
from offline.cycle.stage import StageFailed, StageRun, StageSpec, run_stage


class Action:
    """Writes ``out/result.txt`` from its input file; can be told to fail part way."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.calls = 0
        self.fail = False
        self.seen_partial: list[bool] = []

    def __call__(self, work: Path) -> StageRun:
        self.calls += 1
        self.seen_partial.append((work / "partial.txt").exists())
        (work / "partial.txt").write_text("a command's resumable state")
        if self.fail:
            raise StageFailed("stage s: it broke")
        (work / "out").mkdir(exist_ok=True)
        (work / "out" / "result.txt").write_text(self.source.read_text().upper())
        return StageRun([["echo"]], {"calls": self.calls})


def spec(source: Path, **extra: Any) -> StageSpec:
    return StageSpec("s", {"source": path_fingerprint(source), **extra}, ("out/result.txt",))


def test_a_stage_runs_once_for_the_same_inputs_and_again_when_they_change(
        tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("hello")
    action = Action(source)
    first = run_stage(tmp_path, spec(source), action)
    assert first.status == "ran" and action.calls == 1
    assert (first.out / "result.txt").read_text() == "HELLO"
    record = json.loads((first.folder / "stage.json").read_text())
    assert record["status"] == "complete" and record["commands"] == [["echo"]]
    assert record["output_hash"] == path_fingerprint(first.out)
    again = run_stage(tmp_path, spec(source), action)
    assert again.status == "skipped" and action.calls == 1 and again.record == record
    source.write_text("changed")  # an input file's content
    assert run_stage(tmp_path, spec(source), action).status == "ran" and action.calls == 2
    assert (first.out / "result.txt").read_text() == "CHANGED"
    assert run_stage(tmp_path, spec(source, setting=2), action).status == "ran"  # a setting
    assert sorted(path.name for path in (tmp_path / "stages").iterdir()) == ["s"]


def test_a_failed_stage_is_not_done_and_keeps_its_work_only_for_the_same_inputs(
        tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("hello")
    action = Action(source)
    run_stage(tmp_path, spec(source), action)
    source.write_text("next")
    action.fail = True
    with pytest.raises(StageFailed, match="it broke"):
        run_stage(tmp_path, spec(source), action)
    # The completed stage of the old inputs is still whole; the new one is only in .work.
    assert (tmp_path / "stages" / "s" / "out" / "result.txt").read_text() == "HELLO"
    assert (tmp_path / "stages" / "s.work" / "partial.txt").exists()
    action.fail = False
    assert run_stage(tmp_path, spec(source), action).status == "ran"
    assert action.seen_partial == [False, False, True]  # the retry found its work folder
    action.fail = True
    source.write_text("third")
    with pytest.raises(StageFailed):
        run_stage(tmp_path, spec(source), action)
    source.write_text("fourth")  # other inputs: the work folder of "third" is cleared
    action.fail = False
    run_stage(tmp_path, spec(source), action)
    assert action.seen_partial[-1] is False


def test_a_stage_after_one_that_reran_is_skipped_when_its_input_came_out_the_same(
        tmp_path: Path) -> None:
    """What a store that cannot be fingerprinted does: its stage reruns every time, and the
    next one still skips when the file it reads is byte for byte the same."""
    source = tmp_path / "in.txt"
    source.write_text("hello")
    first, second = Action(source), Action(tmp_path / "stages" / "s" / "out" / "result.txt")

    def chain(nonce: int) -> tuple[str, str]:
        upstream = run_stage(tmp_path, spec(source, nonce=nonce), first)
        downstream = run_stage(tmp_path, StageSpec("t", {
            "data": path_fingerprint(upstream.out / "result.txt")}, ("out/result.txt",)),
            second)
        return upstream.status, downstream.status

    assert chain(1) == ("ran", "ran")
    assert chain(2) == ("ran", "skipped")
    source.write_text("other")
    assert chain(3) == ("ran", "ran")
    assert (first.calls, second.calls) == (3, 2)


def test_missing_outputs_or_a_damaged_record_mean_not_done(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("hello")
    action = Action(source)
    done = run_stage(tmp_path, spec(source), action)
    (done.out / "result.txt").unlink()
    assert run_stage(tmp_path, spec(source), action).status == "ran"
    (done.folder / "stage.json").write_text("{half")
    assert run_stage(tmp_path, spec(source), action).status == "ran"
    assert action.calls == 3

    def writes_nothing(work: Path) -> StageRun:
        return StageRun()

    with pytest.raises(StageFailed, match=r"finished without writing out/result\.txt"):
        run_stage(tmp_path, StageSpec("t", {}, ("out/result.txt",)), writes_nothing)
    assert not (tmp_path / "stages" / "t").exists()


def test_a_sqlite_store_is_fingerprinted_by_its_rows(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "cases.db"
    with sqlite3.connect(path) as database:
        database.execute("CREATE TABLE cases (id TEXT)")
        database.execute("INSERT INTO cases VALUES ('a')")
    url = f"sqlite:///{path}"
    first = store_fingerprint(url)
    assert first is not None and store_fingerprint(url) == first
    with sqlite3.connect(path) as database:
        database.execute("INSERT INTO cases VALUES ('b')")
    assert store_fingerprint(url) != first
    assert store_fingerprint("postgresql://u:p@host/db") is None


def write_config(tmp_path: Path, **changes: Any) -> Path:
    (tmp_path / "guardrail.yaml").write_text("{}\n")
    config: dict[str, Any] = {"proxy_config": "guardrail.yaml", "out": "cycle",
                              "train": {"model": "some/model"}}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config.setdefault(section, {})[name] = value
        else:
            config[section] = value
    path = tmp_path / "cycle.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(("changes", "expected"), [
    ({"trian": {}}, "trian: unknown key (known: proxy_config, out, harvest, correct, train, "
                    "eval)"),
    ({"train__epochs": 3}, "train.epochs: unknown key (known: model, method, settings, args)"),
    ({"train__model": ""}, "train.model: required"),
    ({"train__method": "ppo"}, "train.method: one of sft, dpo, not 'ppo'"),
    ({"train__settings": {"out": "x"}}, "train.settings.out: set by the cycle for each run"),
    ({"train__settings": {"lora": True}}, "lora without merge saves an adapter"),
    ({"harvest__args": {"a": 1}}, "harvest.args: a list of strings"),
    ({"eval__limit": "three"}, "eval.limit: expected a whole number, not 'three'"),
    ({"eval__limit": 0}, "eval.limit: at least 1, not 0"),
    ({"eval__proxy": {"serve": "vllm serve {model}"}}, "eval.proxy.serve: a command template "
                                                        "holding {port}"),
    ({"eval__proxy": {"serve": "x {port}", "ready": 3}}, "eval.proxy.ready: unknown key"),
    ({"correct": {"api_base": "http://x"}}, "correct.model: required when correct is given"),
    ({"out": None}, "--out is required (or 'out' in the config)"),
    ({"proxy_config": None}, "proxy_config: expected a string, not None"),
])
def test_bad_configs_are_one_line(tmp_path: Path, changes: dict[str, Any], expected: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(write_config(tmp_path, **changes))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("guardrail cycle: error: ") and expected in err, err
    assert not (tmp_path / "cycle").exists()


def test_unreadable_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: cannot read it" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("a: [")
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: not YAML" in capsys.readouterr().err


def test_the_cycle_entry_point_is_registered() -> None:
    """pyproject.toml's entry point, loaded as guardrail/cli.py loads it (an install made before
    it landed does not list it yet, so it is read from the file here)."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text("utf-8"))
    value = project["project"]["entry-points"]["guardrail.commands"]["cycle"]
    register = EntryPoint("cycle", value, "guardrail.commands").load()
    parser = argparse.ArgumentParser(prog="guardrail")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cycle", "--config", "c.yaml"])
    assert args.handler is run and args.config == "c.yaml"
