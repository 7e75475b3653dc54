"""The stages of ``guardrail cycle``, in order: harvest, correct (optional), train, then eval of
the base model, the tuned model and (optionally) the proxy in front of each.

Each stage names its inputs for the cache (:mod:`offline.cycle.stage`): its settings, the
fingerprints of what it reads (the previous stage's output files, the base model, the proxy
config, the data folder) and the versions of the packages that run it. Paths into an earlier
stage's folder are its final folder (``DIR/stages/NAME/out``), which exists only once that stage
completed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from guardrail.errors import GuardrailError
from offline.cycle.commands import guardrail_command, run_command
from offline.cycle.config import CycleConfig, EvalStage
from offline.cycle.fingerprint import (
    model_fingerprint,
    package_versions,
    path_fingerprint,
    store_fingerprint,
)
from offline.cycle.serving import proxy_in_front
from offline.cycle.stage import StageFailed, StageOutcome, StageRun, StageSpec, run_stage

OURS = "reasoning-guardrail"
VERSIONS: dict[str, tuple[str, ...]] = {
    "harvest": (OURS, "datasketch", "presidio-analyzer"),
    "correct": (OURS, "litellm"),
    "train": (OURS, "torch", "transformers", "trl", "peft", "accelerate"),
    "eval": (OURS, "inspect-ai", "inspect-evals", "math-verify", "torch", "transformers",
             "vllm"),
}
COMMANDS = ("harvest", "correct", "train", "eval", "serve")
"""The commands a cycle may run (checked against the install before it starts)."""
EVAL_LABELS = {"eval-base": "base", "eval-tuned": "tuned", "eval-proxy-base": "proxy+base",
               "eval-proxy-tuned": "proxy+tuned"}


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict):
                raise StageFailed(f"{path}:{number}: not a JSON object")
            rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                    encoding="utf-8")


def _store_url(config: CycleConfig) -> str:
    if config.harvest.store:
        return config.harvest.store
    from guardrail.config import load_config
    from guardrail.errors import ConfigError

    try:
        return load_config(config.proxy_config).store.url
    except ConfigError as error:
        raise StageFailed(f"stage harvest: proxy config: {error}") from None


@dataclass
class Cycle:
    config: CycleConfig
    root: Path
    log: Callable[[str], None] = lambda line: None
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)

    def _run(self, spec: StageSpec, action: Callable[[Path], StageRun]) -> StageOutcome:
        outcome = run_stage(self.root, spec, action, log=self.log)
        self.outcomes[spec.name] = outcome
        return outcome

    def run(self) -> dict[str, StageOutcome]:
        harvest = self.harvest()
        train_data = harvest.out / "unsafechain.jsonl"
        if self.config.correct is not None:
            train_data = self.correct(train_data).out / "train.jsonl"
        if self.config.train.method == "dpo":
            train_data = harvest.out / "preference_pairs.jsonl"
        tuned = self.train(train_data)
        evaluation = self.config.eval
        if evaluation is not None:
            base_model, tuned_model = self.config.train.model, str(tuned.out)
            self.evaluate("eval-base", base_model, evaluation, behind_proxy=False)
            self.evaluate("eval-tuned", tuned_model, evaluation, behind_proxy=False)
            if evaluation.proxy is not None:
                models = {"base": base_model, "tuned": tuned_model}
                for which in ("base", "tuned"):
                    if which in evaluation.proxy.models:
                        self.evaluate(f"eval-proxy-{which}", models[which], evaluation,
                                      behind_proxy=True)
        return self.outcomes

    # -- harvest --------------------------------------------------------------------------------

    def harvest(self) -> StageOutcome:
        config, name = self.config, "harvest"
        url = _store_url(config)
        try:
            fingerprint = store_fingerprint(url)
            proxy = path_fingerprint(Path(config.proxy_config))
        except (OSError, ValueError, GuardrailError) as error:
            raise StageFailed(f"stage {name}: {error}") from None
        inputs: dict[str, Any] = {
            "proxy_config": config.proxy_config, "proxy_config_fingerprint": proxy,
            "store": url.split("@")[-1],  # no password in the record
            # A store that cannot be fingerprinted is harvested every time: a new nonce.
            "store_fingerprint": fingerprint or f"unhashable:{time.time()}",
            "args": config.harvest.args, "versions": package_versions(VERSIONS["harvest"]),
        }

        def action(work: Path) -> StageRun:
            argv = guardrail_command("harvest", "--config", config.proxy_config, "--out",
                                     str(work / "out"), "--overwrite")
            if config.harvest.store:
                argv += ["--store", config.harvest.store]
            argv += config.harvest.args
            run_command(name, argv, work)
            funnel = json.loads((work / "out" / "funnel.json").read_text("utf-8"))
            return StageRun([argv], {"funnel": funnel})

        return self._run(StageSpec(name, inputs, ("out/unsafechain.jsonl",
                                                  "out/preference_pairs.jsonl")), action)

    # -- correct --------------------------------------------------------------------------------

    def correct(self, harvested: Path) -> StageOutcome:
        settings, name = self.config.correct, "correct"
        assert settings is not None
        inputs: dict[str, Any] = {
            "data_fingerprint": path_fingerprint(harvested), "model": settings.model,
            "api_base": settings.api_base, "api_key_env": settings.api_key_env,
            "select": settings.select, "args": settings.args,
            "proxy_config_fingerprint": path_fingerprint(Path(self.config.proxy_config)),
            "versions": package_versions(VERSIONS["correct"]),
        }

        def action(work: Path) -> StageRun:
            rows = read_rows(harvested)
            chosen = [row for row in rows if row.get("correction") in settings.select]
            chosen_keys = {_key(row) for row in chosen}
            (work / "out").mkdir(exist_ok=True)
            commands: list[list[str]] = []
            corrected: dict[str, dict[str, Any]] = {}
            if chosen:
                write_rows(work / "selected.jsonl", chosen)
                # Outside the stage: correct's response cache (OUT.cache.jsonl, keyed by the
                # hash of each request) outlives a failed try and a change of inputs, so the
                # model is asked only about requests it never answered.
                cache = self.root / "cache" / "correct"
                cache.mkdir(parents=True, exist_ok=True)
                argv = guardrail_command(
                    "correct", "--in", str(work / "selected.jsonl"), "--out",
                    str(cache / "corrected.jsonl"), "--model", settings.model, "--config",
                    self.config.proxy_config, "--no-progress", "--summary",
                    str(work / "correct-summary.json"))
                if settings.api_base:
                    argv += ["--api-base", settings.api_base]
                if settings.api_key_env:
                    argv += ["--api-key-env", settings.api_key_env]
                argv += settings.args
                # Exit 1: some rows were not corrected (listed in the .rejected file); they
                # stay in the training data as harvested.
                run_command(name, argv, work, ok_codes=(0, 1))
                commands.append(argv)
                corrected = {_key(row): row for row in read_rows(cache / "corrected.jsonl")}
            merged = [corrected.get(_key(row), row) if _key(row) in chosen_keys else row
                      for row in rows]
            write_rows(work / "out" / "train.jsonl", merged)
            return StageRun(commands, {"rows": len(rows), "selected": len(chosen),
                                       "corrected": len(corrected),
                                       "kept_as_harvested": len(chosen) - len(corrected)})

        return self._run(StageSpec(name, inputs, ("out/train.jsonl",)), action)

    # -- train ----------------------------------------------------------------------------------

    def train(self, data: Path) -> StageOutcome:
        settings, name = self.config.train, "train"
        try:
            model_print = model_fingerprint(settings.model)
        except OSError as error:
            raise StageFailed(f"stage {name}: base model: {error}") from None
        inputs: dict[str, Any] = {
            "method": settings.method, "model": settings.model, "model_fingerprint": model_print,
            "data_fingerprint": path_fingerprint(data), "settings": settings.settings,
            "args": settings.args, "versions": package_versions(VERSIONS["train"]),
        }

        def action(work: Path) -> StageRun:
            config_file = work / "train.yaml"
            config_file.write_text(yaml.safe_dump(settings.settings), encoding="utf-8")
            out = work / "out"
            argv = guardrail_command("train", settings.method, "--config", str(config_file),
                                     "--data", str(data), "--model", settings.model, "--out",
                                     str(out), *settings.args)
            # An earlier try of these same inputs stopped part way: SFT continues from its
            # last checkpoint; anything else starts again.
            if settings.method == "sft" and any((out / "checkpoints").glob("checkpoint-*")):
                argv.append("--resume")
            elif out.exists():
                argv.append("--overwrite")
            run_command(name, argv, work)
            summary_file = out / "training_summary.json"
            summary = (json.loads(summary_file.read_text("utf-8")) if summary_file.exists()
                       else {})
            return StageRun([argv], summary)

        return self._run(StageSpec(name, inputs, ("out/config.json",)), action)

    # -- eval -----------------------------------------------------------------------------------

    def evaluate(self, name: str, model: str, settings: EvalStage, *,
                 behind_proxy: bool) -> StageOutcome:
        try:
            inputs: dict[str, Any] = {
                "model": model, "model_fingerprint": model_fingerprint(model),
                "suite": settings.suite, "judge": settings.judge, "limit": settings.limit,
                "data_dir": settings.data_dir,
                "data_fingerprint": (path_fingerprint(Path(settings.data_dir))
                                     if settings.data_dir else None),
                "config": settings.config,
                "config_fingerprint": (path_fingerprint(Path(settings.config))
                                       if settings.config else None),
                "judge_fingerprints": {judge: path_fingerprint(Path(judge))
                                       for judge in settings.judge if Path(judge).is_file()},
                "args": settings.args, "versions": package_versions(VERSIONS["eval"]),
            }
        except OSError as error:
            raise StageFailed(f"stage {name}: {error}") from None
        serving = settings.proxy if behind_proxy else None
        proxy_config = Path(serving.config or self.config.proxy_config) if serving else None
        if serving is not None and proxy_config is not None:
            inputs["proxy"] = {"serve": serving.serve,
                               "served_model_name": serving.served_model_name,
                               "config": str(proxy_config),
                               "config_fingerprint": path_fingerprint(proxy_config),
                               "endpoint": settings.endpoint}

        def command(work: Path, target: str) -> list[str]:
            argv = guardrail_command("eval", "--model", target, "--suite", *settings.suite,
                                     "--out", str(work / "out"))
            for judge in settings.judge:
                argv += ["--judge", judge]
            for flag, value in (("--limit", settings.limit),
                                ("--data-dir", settings.data_dir),
                                ("--config", settings.config)):
                if value is not None:
                    argv += [flag, str(value)]
            return argv + settings.args

        def action(work: Path) -> StageRun:
            if serving is None or proxy_config is None:
                argv = command(work, model)
                run_command(name, argv, work)
                return StageRun([argv], {"label": EVAL_LABELS[name]})
            with proxy_in_front(name, model, serving, proxy_config, work) as url:
                argv = command(work, settings.endpoint.replace("{url}", url))
                run_command(name, argv, work)
            return StageRun([argv], {"label": EVAL_LABELS[name]})

        return self._run(StageSpec(name, inputs, ("out/summary.json",)), action)


def _key(row: dict[str, Any]) -> str:
    """A record's identity across correct: its case id (carried over), else its prompt."""
    case_id = row.get("case_id")
    return f"case:{case_id}" if case_id else f"prompt:{row.get('prompt')}"
