"""``guardrail eval compare``: the bootstrap against hand-computed intervals, and the command on
run folders written by hand in the shape ``guardrail eval --out`` writes (summary.json,
items.jsonl)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from offline.eval.bootstrap import bootstrap_delta
from offline.eval.compare import main

ROOT = Path(__file__).resolve().parents[1]


# --- the bootstrap ---------------------------------------------------------------------------

def test_identical_runs_differ_by_exactly_zero() -> None:
    values = {f"i{n}": float(n % 3 == 0) for n in range(50)}
    interval = bootstrap_delta(values, dict(values), resamples=500)
    assert interval is not None and interval.paired
    assert (interval.delta, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert interval.within_noise


def test_a_constant_shift_is_an_interval_of_one_point_beyond_noise() -> None:
    rng = np.random.default_rng(1)
    first = {f"i{n}": float(value) for n, value in enumerate(rng.random(40))}
    second = {key: value + 0.25 for key, value in first.items()}
    interval = bootstrap_delta(first, second, resamples=500)
    assert interval is not None and interval.paired
    assert interval.delta == pytest.approx(0.25)
    assert interval.low == pytest.approx(0.25) and interval.high == pytest.approx(0.25)
    assert not interval.within_noise


def test_two_items_paired_give_the_whole_range() -> None:
    """Differences (0, 1): a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4,
    so the 2.5th percentile is 0 and the 97.5th is 1, and 0 is inside: within noise."""
    interval = bootstrap_delta({"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, resamples=4000)
    assert interval is not None
    assert (interval.delta, interval.low, interval.high) == (0.5, 0.0, 1.0)
    assert interval.within_noise


def test_unpaired_when_the_items_differ() -> None:
    """All-0 against all-1 on other items: every resample differs by exactly 1."""
    interval = bootstrap_delta({f"a{n}": 0.0 for n in range(5)},
                               {f"b{n}": 1.0 for n in range(7)}, resamples=300)
    assert interval is not None and not interval.paired
    assert (interval.delta, interval.low, interval.high) == (1.0, 1.0, 1.0)
    assert (interval.n_first, interval.n_second) == (5, 7)


def test_paired_width_matches_the_normal_approximation() -> None:
    """400 items, 60 flip 0 -> 1 and 20 flip 1 -> 0: the paired differences have mean 0.1 and
    sd sqrt(80/400 - 0.01) = 0.4359, so the 95 % interval is about 0.1 +- 1.96 * 0.4359 / 20
    = [0.0573, 0.1427]; the bootstrap percentiles land within a few thousandths of that."""
    first = {f"i{n}": 0.0 if n < 200 else 1.0 for n in range(400)}
    second = dict(first)
    for n in range(60):
        second[f"i{n}"] = 1.0
    for n in range(200, 220):
        second[f"i{n}"] = 0.0
    interval = bootstrap_delta(first, second, resamples=20000, seed=3)
    assert interval is not None and interval.paired
    half = 1.96 * math.sqrt(80 / 400 - 0.01) / math.sqrt(400)
    assert interval.delta == pytest.approx(0.1)
    assert interval.low == pytest.approx(0.1 - half, abs=0.006)
    assert interval.high == pytest.approx(0.1 + half, abs=0.006)
    assert not interval.within_noise
    again = bootstrap_delta(first, second, resamples=20000, seed=3)
    assert again == interval  # seeded


def test_no_items_no_interval() -> None:
    assert bootstrap_delta({}, {"a": 1.0}) is None


# --- the command -----------------------------------------------------------------------------

def write_run(folder: Path, benchmarks: dict[str, dict[str, Any]],
              items: dict[str, dict[str, dict[str, float]]], model: str = "m") -> Path:
    """A run folder: ``benchmarks`` as summary.json holds them, ``items`` bench -> item id ->
    per-item values."""
    folder.mkdir(parents=True)
    summary = {"schema_version": 1, "model": model, "generation": {"temperature": 0},
               "benchmarks": benchmarks}
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    lines = [json.dumps({"benchmark": bench, "item_id": item, "values": values})
             for bench, by_item in items.items() for item, values in by_item.items()]
    (folder / "items.jsonl").write_text("".join(line + "\n" for line in lines), "utf-8")
    return folder


def bench(suite: str, metrics: dict[str, float | None], n: int) -> dict[str, Any]:
    return {"suite": suite, "n_items": n, "n_errors": 0, "epochs": 1, "metrics": metrics}


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """base: 10 StrongREJECT items, 6 harmful; tuned: the same items, 1 harmful; proxy: other
    items (unpaired), 5 of 10 harmful, no over-refusal benchmark, and a metric of its own."""
    ids = [f"sr{n}" for n in range(10)]
    harm_base = [1.0] * 6 + [0.0] * 4
    harm_tuned = [1.0] + [0.0] * 9
    tokens = {"mean_reasoning_tokens": 812.0}
    base = write_run(tmp_path / "a" / "base", {
        "strongreject": bench("safety", {"harmful_rate_full": 0.6, **tokens}, 10),
        "xstest": bench("over-refusal", {"compliance_rate": 0.9}, 2),
    }, {"strongreject": {i: {"harmful_rate_full": v} for i, v in zip(ids, harm_base,
                                                                      strict=True)},
        "xstest": {"x1": {"compliance_rate": 1.0}, "x2": {"compliance_rate": 0.8}}})
    tuned = write_run(tmp_path / "b" / "tuned", {
        "strongreject": bench("safety", {"harmful_rate_full": 0.1,
                                         "mean_reasoning_tokens": 640.0}, 10),
        "xstest": bench("over-refusal", {"compliance_rate": None}, 2),
    }, {"strongreject": {i: {"harmful_rate_full": v} for i, v in zip(ids, harm_tuned,
                                                                      strict=True)},
        "xstest": {}})
    proxy = write_run(tmp_path / "c" / "proxy", {
        "strongreject": bench("safety", {"harmful_rate_full": 0.5, "proxy_interventions": 3.0},
                              10),
    }, {"strongreject": {f"other{n}": {"harmful_rate_full": float(n < 5)} for n in range(10)}})
    return base, tuned, proxy


def test_compare_writes_tables_json_and_plots(runs: tuple[Path, Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    base, tuned, proxy = runs
    out = tmp_path / "cmp"
    assert main([str(base), str(tuned), str(proxy), "--out", str(out),
                 "--resamples", "2000"]) == 0
    data = json.loads((out / "compare.json").read_text("utf-8"))
    assert data["baseline"] == "base" and [run["label"] for run in data["runs"]] == [
        "base", "tuned", "proxy"]
    harm = data["benchmarks"]["strongreject"]["metrics"]["harmful_rate_full"]
    assert harm["values"] == {"base": 0.6, "tuned": 0.1, "proxy": 0.5}
    tuned_delta = harm["deltas"]["tuned"]
    assert tuned_delta["delta"] == pytest.approx(-0.5)
    # paired differences: five items went 1 -> 0, five unchanged; every resample of ten is at
    # most 0 and the 97.5th percentile is below 0: beyond noise.
    assert tuned_delta["paired"] is True and tuned_delta["n"] == [10, 10]
    low, high = tuned_delta["ci"]
    assert -1.0 <= low < -0.5 < high < 0 and tuned_delta["within_noise"] is False
    assert tuned_delta["verdict"] == "beyond noise"
    proxy_delta = harm["deltas"]["proxy"]
    assert proxy_delta["paired"] is False and proxy_delta["delta"] == pytest.approx(-0.1)
    assert proxy_delta["within_noise"] is True and proxy_delta["verdict"] == "within noise"
    tokens = data["benchmarks"]["strongreject"]["metrics"]["mean_reasoning_tokens"]
    assert tokens["values"] == {"base": 812.0, "tuned": 640.0, "proxy": "missing"}
    assert tokens["deltas"]["tuned"] == {"delta": -172.0, "ci": None, "paired": None, "n": None,
                                         "within_noise": None, "verdict": "no per-item values"}
    assert tokens["deltas"]["proxy"]["verdict"] == "missing"
    own = data["benchmarks"]["strongreject"]["metrics"]["proxy_interventions"]
    assert own["values"] == {"base": "missing", "tuned": "missing", "proxy": 3.0}
    xstest = data["benchmarks"]["xstest"]
    assert xstest["runs"]["proxy"] is None
    assert xstest["metrics"]["compliance_rate"]["values"]["tuned"] is None
    assert xstest["metrics"]["compliance_rate"]["deltas"]["tuned"]["verdict"] == "missing"

    text = (out / "compare.md").read_text("utf-8")
    assert "## strongreject (safety)" in text and "## xstest (over-refusal)" in text
    row = next(line for line in text.splitlines() if line.startswith("| harmful_rate_full"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == ["harmful_rate_full", "0.600", "0.100"]
    assert cells[3].startswith("-0.500 [") and cells[3].endswith("beyond noise")
    assert cells[4] == "0.500" and cells[5].startswith("-0.100 [")
    assert cells[5].endswith("within noise, unpaired")
    xs_row = next(line for line in text.splitlines() if line.startswith("| compliance_rate"))
    assert [cell.strip() for cell in xs_row.strip("|").split("|")] == [
        "compliance_rate", "0.900", "n/a", "—", "missing", "—"]
    pngs = sorted(path.name for path in (out / "plots").iterdir())
    assert pngs == ["strongreject.png"]  # xstest: every difference missing, nothing to draw
    assert (out / "plots" / "strongreject.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 run(s) against base" in capsys.readouterr().err


def test_compare_is_seeded(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, tuned, _ = runs
    for name in ("one", "two"):
        assert main([str(base), str(tuned), "--out", str(tmp_path / name), "--no-plots",
                     "--resamples", "500", "--seed", "7"]) == 0
    assert (tmp_path / "one" / "compare.json").read_text() == (
        tmp_path / "two" / "compare.json").read_text()
    assert not (tmp_path / "one" / "plots").exists()


def test_same_folder_names_get_their_parents(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    one = write_run(tmp_path / "base" / "out", {"b": bench("safety", {"m": 1.0}, 1)},
                    {"b": {"i": {"m": 1.0}}})
    two = write_run(tmp_path / "tuned" / "out", {"b": bench("safety", {"m": 1.0}, 1)},
                    {"b": {"i": {"m": 1.0}}})
    assert main([str(one), str(two)]) == 0
    text = capsys.readouterr().out
    assert "# Comparison against base/out" in text and "| tuned/out |" in text
    assert "+0.000 [0.000, 0.000] within noise" in text


@pytest.mark.parametrize(("case", "expected"), [
    ("one-dir", "give at least two run folders"),
    ("not-a-dir", "not a folder"),
    ("no-summary", "no summary.json (not a finished guardrail eval run)"),
    ("bad-json", "summary.json: not JSON"),
    ("old-schema", "schema_version 0; this compare reads version 1"),
    ("bad-metric", "strongreject.metrics.harmful_rate_full: a number or null, not 'high'"),
    ("bad-item", "items.jsonl:2: not JSON"),
    ("twice", "items.jsonl:2: item 'sr0' of strongreject is listed twice"),
    ("unknown-bench", "benchmark 'gsm8k' is not in summary.json"),
    ("labels", "--labels: 2 different names, one per folder"),
])
def test_bad_folders_are_one_line(runs: tuple[Path, Path, Path], tmp_path: Path, case: str,
                                  expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    base, tuned, _ = runs
    argv = [str(base), str(tuned)]
    broken = tmp_path / "broken"
    if case == "one-dir":
        argv = [str(base)]
    elif case == "not-a-dir":
        argv[1] = str(tmp_path / "nowhere")
    elif case == "labels":
        argv += ["--labels", "x,x"]
    else:
        broken.mkdir()
        argv[1] = str(broken)
        good = (tuned / "summary.json").read_text("utf-8")
        item = json.dumps({"benchmark": "strongreject", "item_id": "sr0",
                           "values": {"harmful_rate_full": 1.0}})
        summary, items = {
            "no-summary": (None, None),
            "bad-json": ("{", None),
            "old-schema": (good.replace('"schema_version": 1', '"schema_version": 0'), None),
            "bad-metric": (good.replace('"harmful_rate_full": 0.1',
                                        '"harmful_rate_full": "high"'), None),
            "bad-item": (good, item + "\n{oops\n"),
            "twice": (good, item + "\n" + item + "\n"),
            "unknown-bench": (good, item + "\n" + item.replace("strongreject", "gsm8k") + "\n"),
        }[case]
        if summary is not None:
            (broken / "summary.json").write_text(summary, "utf-8")
        if items is not None:
            (broken / "items.jsonl").write_text(items, "utf-8")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("guardrail eval compare: error: ") and expected in err, err


def test_runs_as_a_module(runs: tuple[Path, Path, Path]) -> None:
    base, tuned, _ = runs
    result = subprocess.run([sys.executable, "-m", "offline.eval.compare", str(base),
                             str(tuned), "--resamples", "200"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "| harmful_rate_full | 0.600 | 0.100 | -0.500 [" in result.stdout


def test_guardrail_eval_compare_is_a_subcommand_of_eval(
        runs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Registered through guardrail eval's subcommand hook, as the ``guardrail`` parser builds
    it; ``guardrail eval --model ...`` keeps its own handler."""
    from offline.eval.command import add_eval_parser, run_eval

    parser = argparse.ArgumentParser(prog="guardrail")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    base, tuned, _ = runs
    args = parser.parse_args(["eval", "compare", str(base), str(tuned), "--resamples", "100"])
    assert args.handler(args) == 0
    assert "| harmful_rate_full | 0.600 | 0.100 | -0.500 [" in capsys.readouterr().out
    assert parser.parse_args(["eval", "--model", "m"]).handler is run_eval
