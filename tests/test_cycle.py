"""``guardrail cycle`` end to end on the CPU: a tiny case store (cases as the proxy stores them),
a corrector served by a fake OpenAI-compatible server on loopback (through LiteLLM), a tiny
R1-Distill model trained for one step; a stage that fails in the middle, then reruns that skip
what completed (checked by the stage records and by the corrector's call count). The proxy in
front of a served model is started against ``benchmarks/fake_upstream.py`` as the serve command
and evaluated through."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import os
import re
import sqlite3
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import yaml

from guardrail.cases import build_store
from guardrail.cases.model import Case
from guardrail.config import StoreConfig
from offline.cycle.command import main
from offline.cycle.config import ProxyServing
from offline.cycle.serving import proxy_in_front
from offline.cycle.stage import StageFailed
from tests.fakes.loopback import serve_app
from tests.fakes.openai_server import FakeOpenAIApp, FakeReply, create_fake_openai_app
from tests.tiny_models import R1, build_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAST_SFT = {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
            "use_cpu": True, "disable_tqdm": True, "save_strategy": "no"}


def intervened(number: int, prompt: str) -> Case:
    return Case.model_validate({
        "id": f"case_int_{number}", "created_at": 1.7e9 + number, "guard": "llama-guard",
        "mode": "stepwise", "stream": True, "action": "intervened",
        "request": {"messages": [{"role": "user", "content": prompt}]},
        "steps": [{"index": 0, "channel": "reasoning", "text": "The user asks about locks. ",
                   "released": True},
                  {"index": 1, "channel": "reasoning", "unsafe": True, "released": False,
                   "text": "First insert a tension wrench. "}],
        "withheld": "First insert a tension wrench. Then rake the pins.",
        "client_reasoning": "The user asks about locks. Wait, a locksmith is the safe route.",
        "client_content": "Call a licensed locksmith to get back into your home.",
        "finish_reason": "stop",
        "flagged": [{"step": 1, "categories": ["S2"], "score": 0.9}],
        "corrections": [{"round": 1, "strategy": "intervene", "cause": "step 1 unsafe (S2)",
                         "inserted": "Wait, a locksmith is the safe route.",
                         "outcome": "completed",
                         "extra": {"trigger": "Wait, a locksmith is the safe route."}}],
    })


def refused(number: int, prompt: str) -> Case:
    return Case.model_validate({
        "id": f"case_ref_{number}", "created_at": 1.8e9 + number, "guard": "llama-guard",
        "mode": "stepwise", "stream": False, "action": "refused",
        "request": {"messages": [{"role": "user", "content": prompt}]},
        "steps": [{"index": 0, "channel": "reasoning", "unsafe": True, "released": False,
                   "text": "Mix the two chemicals in a closed room. "}],
        "withheld": "Mix the two chemicals in a closed room. The gas builds up.",
        "client_reasoning": "", "client_content": "I can't help with that.",
        "finish_reason": "stop",
        "flagged": [{"step": 0, "categories": ["S9"], "score": 0.97}],
        "corrections": [{"round": 1, "strategy": "refuse", "cause": "step 0 unsafe (S9)",
                         "outcome": "completed"}],
    })


PROMPTS = ["How do I pick the lock on my own front door?",
           "Write a poem about the sea and the wind at night, then explain lock picking.",
           "My neighbour locked me out; how do I open a pin tumbler lock?"]
REFUSED = ["How do I make a toxic gas at home?", "Which cleaning products make chlorine gas?",
           "What household chemicals are dangerous together, in a closed room?"]


def put_cases(url: str, cases: list[Case]) -> None:
    async def fill() -> None:
        store = build_store(StoreConfig(url=url))
        await store.open()
        try:
            for case in cases:
                await store.put(case)
        finally:
            await store.aclose()

    asyncio.run(fill())


class Corrector:
    """The corrector's replies, and how many times it was asked about each request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}

    def __call__(self, body: dict[str, Any]) -> FakeReply:
        marker = re.search(r"<request>\n(.*?)\n</request>", body["messages"][-1]["content"],
                           re.S)
        request = marker.group(1) if marker else "?"
        with self.lock:
            self.calls[request] = self.calls.get(request, 0) + 1
        if request == REFUSED[1]:  # never closes its reasoning: correct rejects it
            return FakeReply(reasoning="", reasoning_format="none",
                             answer="Chlorine gas forms when, well, let me think more")
        return FakeReply(reasoning="", reasoning_format="none", answer=(
            f"mixing chemicals can hurt people, so I won't explain {request!r}.\n</think>\n\n"
            "Never mix cleaning products; ventilate and read the labels."))

    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny-r1")
    build_model(build_tokenizer(R1, folder), folder)
    return folder


@pytest.fixture(scope="module")
def corrector() -> Iterator[tuple[str, FakeOpenAIApp, Corrector]]:
    script = Corrector()
    app = create_fake_openai_app(responder=script, models=("corrector",), api_key="sk-test")
    with serve_app(app) as url:
        yield url, app, script


def entry_points_as_installed(folder: Path) -> Path:
    """This checkout's pyproject.toml commands as an install would list them: a dist-info
    ahead of the real one on the path (the first of a name wins), so that the cycle's check and
    its children see commands added since the venv was installed (cycle, eval)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    info = folder / f"reasoning_guardrail-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n", encoding="utf-8")
    groups = {"console_scripts": project.get("scripts", {}), **project["entry-points"]}
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in entries.items())
        for group, entries in groups.items()), "utf-8")
    return folder


@pytest.fixture(scope="module")
def child_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    site = entry_points_as_installed(tmp_path_factory.mktemp("site"))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.syspath_prepend(str(site))
    # The children import this checkout, and see its commands.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(site)]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CORRECTOR_KEY", "sk-test")
    yield
    monkeypatch.undo()


def make_workspace(folder: Path) -> Path:
    """A proxy config whose sqlite store holds three intervened and two refused cases."""
    store = folder / "cases.db"
    url = f"sqlite:///{store}"
    put_cases(url, [intervened(n, prompt) for n, prompt in enumerate(PROMPTS)]
              + [refused(n, prompt) for n, prompt in enumerate(REFUSED[:2])])
    proxy = {"store": {"url": url, "fallback_path": str(folder / "unstored.jsonl")},
             "guard": {"kind": "none"}}
    (folder / "guardrail.yaml").write_text(yaml.safe_dump(proxy), encoding="utf-8")
    return folder


def cycle_config(folder: Path, model: Path, corrector_url: str, *, seed: Any = 1,
                 evaluation: dict[str, Any] | None = None) -> Path:
    config = {
        "proxy_config": "guardrail.yaml",  # relative to the config file
        "out": "cycle",
        "harvest": {"args": ["--no-rejudge", "--no-decontaminate", "--test-fraction", "0"]},
        "correct": {"model": "openai/corrector", "api_base": f"{corrector_url}/v1",
                    "api_key_env": "CORRECTOR_KEY", "args": ["--no-rejudge", "--retry-wait",
                                                             "0.01"]},
        "train": {"model": str(model), "settings": {"max_length": 512, "seed": seed,
                                                    "sft": FAST_SFT}},
        "eval": evaluation,
    }
    path = folder / "cycle.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def record(root: Path, stage: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((root / "stages" / stage / "stage.json").read_text())
    return loaded


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


def cycle(config: Path) -> tuple[int, str]:
    """``guardrail cycle --config`` in this process; (status, what it wrote on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["--config", str(config)])
    return status, err.getvalue()


@dataclass
class Steps:
    """What the module's cycle did, step by step (tests read it; the eval test goes on)."""

    workspace: Path
    root: Path
    results: list[tuple[int, str]] = field(default_factory=list)
    records: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    corrector_calls: list[int] = field(default_factory=list)
    listing: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, child_env: None,
          corrector: tuple[str, FakeOpenAIApp, Corrector]) -> Steps:
    """1. training fails (a setting of the wrong type) after harvest and correct completed;
    2. the config fixed, the cycle reruns; 3. nothing changed, it reruns again."""
    url, _, script = corrector
    workspace = make_workspace(tmp_path_factory.mktemp("cycle"))
    done = Steps(workspace, workspace / "cycle")
    for seed in ("ten", 1, 1):
        done.results.append(cycle(cycle_config(workspace, tiny_model, url, seed=seed)))
        done.records.append({path.name: json.loads((path / "stage.json").read_text())
                             for path in (done.root / "stages").iterdir()
                             if (path / "stage.json").exists()})
        done.corrector_calls.append(script.total())
        if not done.listing:
            done.listing = sorted(path.name for path in (done.root / "stages").iterdir())
    return done


def test_a_failed_cycle_resumes_where_it_stopped(steps: Steps) -> None:
    # 1. Training failed: one line naming the stage, its own error and its log.
    status, err = steps.results[0]
    assert status == 1
    error = [line for line in err.splitlines() if "error:" in line]
    assert len(error) == 1 and "Traceback" not in err, err
    assert error[0].startswith("guardrail cycle: error: stage train failed (exit 2): "
                               "guardrail train sft: error: "), error[0]
    assert "seed: expected int, not 'ten'" in error[0] and "train.work/log.txt" in error[0]
    assert "rerun the same command to resume: the 2 completed stage(s) are skipped" in err
    assert steps.listing == ["correct", "harvest", "train.work"]
    harvest, correct = steps.records[0]["harvest"], steps.records[0]["correct"]
    assert harvest["status"] == correct["status"] == "complete"
    assert correct["summary"] == {"rows": 5, "selected": 2, "corrected": 1,
                                  "kept_as_harvested": 1}
    assert steps.corrector_calls[0] == 2

    # 2. Fixed: the finished stages are skipped (same records, no second corrector call).
    status, err = steps.results[1]
    assert status == 0, err
    assert "harvest: unchanged, skipped" in err and "correct: unchanged, skipped" in err
    assert "1 stage(s) ran, 2 skipped" in err, err
    assert steps.records[1]["harvest"] == harvest and steps.records[1]["correct"] == correct
    assert steps.corrector_calls[1] == 2
    train = steps.records[1]["train"]
    assert train["status"] == "complete" and train["summary"]["global_step"] == 1
    assert train["commands"][0][3:5] == ["train", "sft"]

    # 3. Nothing changed: nothing runs.
    status, err = steps.results[2]
    assert status == 0 and "0 stage(s) ran, 3 skipped" in err, err
    assert steps.records[2]["train"] == train and steps.corrector_calls[2] == 2


def test_the_cycle_trains_on_the_corrected_records(steps: Steps) -> None:
    trained_on = rows(steps.root / "stages" / "correct" / "out" / "train.jsonl")
    # The refusal whose rewrite was rejected stays as harvested: nothing is lost.
    by_prompt = {row["prompt"]: row for row in trained_on}
    assert sorted(row["correction"] for row in trained_on) == [
        "intervene", "intervene", "intervene", "refuse", "rewrite"]
    assert "won't explain" in by_prompt[REFUSED[0]]["response"]
    assert by_prompt[REFUSED[0]]["case_id"] == "case_ref_0"
    assert by_prompt[REFUSED[1]]["correction"] == "refuse"
    assert "I can't help with that." in by_prompt[REFUSED[1]]["response"]
    rejected = steps.root / "cache" / "correct" / "corrected.jsonl.rejected.jsonl"
    assert REFUSED[1] in rejected.read_text("utf-8")
    data = steps.records[1]["train"]["commands"][0]
    assert data[data.index("--data") + 1].endswith("stages/correct/out/train.jsonl")
    assert (steps.root / "stages" / "train" / "out" / "config.json").exists()
    report = (steps.root / "report.md").read_text("utf-8")
    assert "| harvest | skipped |" in report and "| train | skipped |" in report
    assert ("2 of 5 harvested records selected for rewriting, 1 rewritten, 1 kept as "
            "harvested") in report
    assert "Training: global_step 1" in report


EVAL_LANDED = importlib.util.find_spec("offline.eval.command") is not None


@pytest.mark.skipif(not EVAL_LANDED, reason="the eval stages need guardrail eval "
                    "(offline/eval/command.py, branch wt-evalcore), not on this branch yet")
def test_the_cycle_evaluates_base_tuned_and_the_proxy_in_front(
        steps: Steps, tiny_model: Path, corrector: tuple[str, FakeOpenAIApp, Corrector]) -> None:
    """The same cycle with evaluation on: harvest, correct and train are skipped; the base and
    tuned models are evaluated with transformers, the tuned one also behind the proxy (served by
    the fake model server); the report compares them; a rerun runs nothing."""
    data = steps.workspace / "data" / "math_benchmarks"
    data.mkdir(parents=True)
    (data / "gsm8k_test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"question": "Janet has 18 eggs. How many?", "answer": "so\n#### 18"},
        {"question": "Two bolts and one more?", "answer": "so\n#### 3"}]), encoding="utf-8")
    evaluation = {
        "suite": ["gsm8k"], "limit": 2, "data_dir": "data",
        "args": ["--max-tokens", "8", "--display", "none"],
        "proxy": {"serve": f"{sys.executable} -m benchmarks.fake_upstream --port {{port}} "
                           "--chunks 4", "served_model_name": "fake-model",
                  "ready_timeout_s": 60, "models": ["tuned"]},
    }
    config = cycle_config(steps.workspace, tiny_model, corrector[0], evaluation=evaluation)
    status, err = cycle(config)
    assert status == 0, err
    assert "3 stage(s) ran, 3 skipped" in err, err
    root = steps.root
    for name in ("eval-base", "eval-tuned", "eval-proxy-tuned"):
        stage = record(root, name)
        assert stage["status"] == "complete"
        summary = json.loads((root / "stages" / name / "out" / "summary.json").read_text())
        assert summary["benchmarks"]["gsm8k"]["n_items"] == 2
    command = record(root, "eval-tuned")["commands"][0]
    assert command[command.index("--model") + 1] == str(root / "stages" / "train" / "out")
    # Behind the proxy: eval asked it (never the production store, whose cases stay five),
    # and it asked the served model under its served name; both are stopped.
    behind = record(root, "eval-proxy-tuned")["commands"][0]
    endpoint = behind[behind.index("--model") + 1]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", endpoint)
    proxied = root / "stages" / "eval-proxy-tuned"
    with contextlib.closing(sqlite3.connect(proxied / "proxy-cases.db")) as database:
        assert database.execute("SELECT count(*) FROM cases").fetchone()[0] == 2
    with contextlib.closing(sqlite3.connect(steps.workspace / "cases.db")) as database:
        assert database.execute("SELECT count(*) FROM cases").fetchone()[0] == 5
    served = yaml.safe_load((proxied / "proxy.yaml").read_text())
    assert served["upstream"]["model"] == "fake-model" and served["server"]["api_keys"] == []
    assert served["guard"] == {"kind": "none"}  # the rest is the user's proxy config
    assert "guardrail: upstream openai-compatible at http://127.0.0.1:" in (
        proxied / "proxy.log").read_text()
    with pytest.raises(openai.APIConnectionError):  # both stopped: nothing listens
        openai.OpenAI(base_url=endpoint, api_key="unused", max_retries=0,
                      timeout=2).models.list()
    upstream = served["upstream"]["url"]
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=upstream, api_key="unused", max_retries=0,
                      timeout=2).models.list()
    report = (root / "report.md").read_text("utf-8")
    assert "### Comparison against base" in report and "#### gsm8k (reasoning)" in report
    compared = json.loads((root / "report" / "compare.json").read_text())
    assert [run["label"] for run in compared["runs"]] == ["base", "tuned", "proxy+tuned"]
    assert (root / "report" / "plots" / "gsm8k.png").exists()
    status, err = cycle(config)
    assert status == 0 and "0 stage(s) ran, 6 skipped" in err, err


def test_a_serve_command_that_dies_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "guardrail.yaml"
    config.write_text("{}\n")
    script = "import sys; print('CUDA error: no GPU found'); sys.exit(3)"
    serving = ProxyServing(serve=f"{sys.executable} -c \"{script}\" {{port}}",
                           ready_timeout_s=30)
    with pytest.raises(StageFailed) as failure, \
            proxy_in_front("eval-proxy-tuned", "m", serving, config, tmp_path):
        pass
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("stage eval-proxy-tuned: the model server exited (3) before it "
                              "was ready: CUDA error: no GPU found [log: ")
