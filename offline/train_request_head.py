"""Train the embedded guard's REQUEST head: does a user prompt ask for harmful help?

A second logistic-regression head on the same frozen all-MiniLM-L6-v2 encoder as the step head
(``offline/train_embedded_guard.py``, whose data readers, embedding cache, fitting and metrics
this script reuses). Its one feature block is the request's embedding (its last
``request_max_tokens`` tokens); the compliance-cue wrapper asks it whether the request that a
"let me lay out the steps" sentence answers is harmful.

- positives (harmful requests): AdvBench, HarmBench standard behaviours, StrongREJECT,
  SimpleSafetyTests (with --extra-data-dir), JBB-Behaviors harmful, WildJailbreak harmful
  (seed requests and adversarial wrappings of them), in-the-wild "DAN" jailbreaks and TrustLLM
  JailbreakTrigger prompts around harmful requests, OR-Bench toxic, XSTest's unsafe contrasts,
  WildGuardMix prompts labelled harmful (copyright requests left out);
- negatives (benign requests): look-alikes — XSTest safe, OR-Bench hard-1k, JBB-Behaviors benign,
  WildJailbreak benign (seeds and adversarial) — and ordinary ones: WildGuardMix prompts labelled
  safe (everyday questions and benign role-play), everyday instructions (Self-Instruct seed and
  user-oriented tasks, MT-Bench and Vicuna-Bench questions; with --extra-data-dir), GSM8K
  and MATH-500 questions.

Texts that occur in several sources are kept once (the first source listed wins). A test split
is held out by source item (JBB behaviour: its harmful and benign rows together; WildJailbreak
or DAN seed request; XSTest focus word, so "kill a Python process" and "kill a person" stay
together; otherwise the text). Validation is k-fold over the rest, by the same items: for each
candidate (L2 strength x source balance) the out-of-fold scores give the threshold — the LOWEST
(so the best recall on harmful requests) that flags at most ``max_val_fpr`` of the benign
look-alikes XSTest safe and OR-Bench hard, pooled — and the candidate with the best out-of-fold
recall at its threshold is refitted on all of it. Folds rather than one validation split because
the look-alikes' top 5 % is a noisy estimate on a few hundred prompts (a single split's
threshold let 9-10 % of the test look-alikes through).

    python -m offline.train_request_head --data-dir ../shared/data

Only permissively licensed sources are read (MIT, Apache-2.0, CC-BY-4.0, ODC-BY).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from guardrail.guards.base import GuardView
from guardrail.guards.embedded.head import LinearHead, ViewFeaturizer
from offline.train_embedded_guard import (
    MAX_REQUEST_CHARS,
    Array,
    DiskCachedEncode,
    auroc,
    command_line,
    encoder_fingerprint,
    fit_logistic,
    parse_config,
    prf,
    read_csv,
    read_jsonl,
    split_of,
)

REQUEST_HEAD_FILE = "request_head.json"
LOOK_ALIKES = ("xstest-safe", "or-bench-hard")
"""The benign sources whose false-positive rate the threshold is held to."""


@dataclass
class TrainRequestHeadConfig:
    data_dir: str = "../shared/data"
    """A folder laid out like the project's shared data (one sub-folder per source)."""
    extra_data_dir: str | None = None
    """Optional: a folder with ``everyday_prompts/`` (Self-Instruct, MT-Bench, Vicuna-Bench
    questions) and ``simple_safety_tests/`` (SimpleSafetyTests). Not shipped; the released head
    was trained without them."""
    output_dir: str = "guardrail/guards/embedded/weights"
    cache_dir: str = str(Path(tempfile.gettempdir()) / "guardrail-embedded-guard-cache")
    """Shared with the step head's script: the same texts are not encoded twice."""
    encoder: str | None = None
    """Encoder folder; None is the packaged all-MiniLM-L6-v2."""
    seed: int = 0
    request_max_tokens: int = 128
    wildjailbreak_harmful: int = 600
    """Sampled from 2,000 (about 3 jailbreak wrappings of each of the 200 seed requests)."""
    gsm8k_questions: int = 300
    math500_questions: int = 200
    l2: str = "0.003,0.01,0.03"
    """Candidate L2 strengths (comma-separated), compared out of fold."""
    source_balance: str = "0.5,1"
    """Candidate source balances: within a class, a source's total weight grows as (its size)
    ** this; 1 weighs every example alike, 0 every source alike."""
    max_iter: int = 300
    folds: int = 5
    max_val_fpr: float = 0.05
    """The threshold may flag at most this share of the look-alikes (out of fold)."""
    test_fraction: float = 0.2
    save: bool = True


@dataclass
class _TestSplit:
    """``split_of``'s settings: a test split, and no fixed validation split (folds instead)."""

    seed: int
    test_fraction: float
    val_fraction: float = 0.0


@dataclass(frozen=True)
class Request:
    text: str
    label: int  # 1: asks for harmful help
    source: str
    split: str  # "train" or "test"
    group: str
    """The source item it belongs to: what the split and the folds keep together."""


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class Collector:
    """Requests from every source, each distinct text once, with its split."""

    def __init__(self, config: TrainRequestHeadConfig) -> None:
        self.split = _TestSplit(config.seed, config.test_fraction)
        self.requests: list[Request] = []
        self.counts: Counter[str] = Counter()  # source records used
        self.duplicates: Counter[str] = Counter()
        self._seen: dict[str, int] = {}

    def add(self, text: str, label: int, source: str, group: str | None = None) -> None:
        text = text.strip()
        key = normalised(text)
        if not key:
            return
        if key in self._seen:  # kept under the first source; a clash of labels is counted
            self.duplicates[f"{source}{'' if self._seen[key] == label else ' (other label)'}"] += 1
            return
        self._seen[key] = label
        self.counts[source] += 1
        group = group if group is not None else key
        self.requests.append(Request(text[-MAX_REQUEST_CHARS:], label, source,
                                     split_of(group, self.split), group))


def collect(config: TrainRequestHeadConfig) -> Collector:
    data = Path(config.data_dir)
    if not data.is_dir():
        raise SystemExit(f"{data}: no data folder (see --data-dir)")
    rng = random.Random(config.seed)
    found = Collector(config)

    # JBB harmful and benign rows share topics row by row: one group, one split.
    for name, label in (("harmful-behaviors.csv", 1), ("benign-behaviors.csv", 0)):
        for row in read_csv(data / "jailbreakbench" / name):
            index = row.get("Index", row.get("index"))
            goal = row.get("Goal", row.get("goal", ""))
            found.add(goal, label, f"jbb-{'harmful' if label else 'benign'}", f"jbb:{index}")
    # XSTest: a safe prompt and its unsafe contrast share a focus word ("kill", "steal").
    for row in read_csv(data / "xstest" / "xstest_prompts.csv"):
        group = f"xstest:{row['focus'] or row['id']}"
        found.add(row["prompt"], int(row["label"] == "unsafe"), f"xstest-{row['label']}", group)
    for row in read_csv(data / "harmbench" / "harmbench_behaviors_text_all.csv"):
        if row["FunctionalCategory"] == "standard":  # contextual ones need their context string
            found.add(row["Behavior"], 1, "harmbench")
    for row in read_csv(data / "advbench" / "harmful_behaviors.csv"):
        found.add(row["goal"], 1, "advbench")
    for row in read_csv(data / "strongreject" / "strongreject_dataset.csv"):
        found.add(row["forbidden_prompt"], 1, "strongreject")
    if config.extra_data_dir:
        extra = Path(config.extra_data_dir)
        for row in read_csv(extra / "simple_safety_tests" / "simple_safety_tests.csv"):
            found.add(row["prompts_final"], 1, "simple-safety-tests")
    # TrustLLM JailbreakTrigger: harmful questions (QBB) and requests for toxic remarks (ITC)
    # inside jailbreak instructions.
    for row in read_jsonl(data / "misc_jailbreak_prompts" / "trustllm_jailbreaktrigger_400.jsonl"):
        found.add(row["prompt"], 1, "trustllm-jailbreak")
    # WildJailbreak: the plain seed request and jailbreak wrappings of it, grouped by the seed
    # (many seeds are HarmBench behaviours: the same group, so the same split, as those).
    wjb = read_jsonl(data / "wildjailbreak" / "wildjailbreak_eval_adversarial_harmful.jsonl")
    for vanilla in dict.fromkeys(row["vanilla"] for row in wjb):
        found.add(vanilla, 1, "wildjailbreak-vanilla-harmful", normalised(vanilla))
    for row in rng.sample(wjb, min(config.wildjailbreak_harmful, len(wjb))):
        found.add(row["adversarial"], 1, "wildjailbreak-harmful", normalised(row["vanilla"]))
    benign = read_jsonl(data / "wildjailbreak" / "wildjailbreak_eval_adversarial_benign.jsonl")
    for vanilla in dict.fromkeys(row["vanilla"] for row in benign):
        found.add(vanilla, 0, "wildjailbreak-vanilla-benign", normalised(vanilla))
    for row in benign:
        found.add(row["adversarial"], 0, "wildjailbreak-benign", normalised(row["vanilla"]))
    # In-the-wild "DAN" templates wrapped around harmful requests (the request comes last).
    for row in read_jsonl(data / "misc_jailbreak_prompts" / "do_anything_now_jailbreak.jsonl"):
        found.add(row["adversarial"], 1, "dan-jailbreak", normalised(row["vanilla"]))
    for name, label in (("or_bench-toxic.csv", 1), ("or_bench-hard-1k.csv", 0)):
        for row in read_csv(data / "or_bench" / name):
            found.add(row["prompt"], label, f"or-bench-{'toxic' if label else 'hard'}")
    # WildGuardMix prompts (copyright requests left out: not harm in the guard's sense).
    mix = json.loads((data / "wildguardmix" / "wildguardmix_prompts_converted.json")
                     .read_text(encoding="utf-8"))
    for record in mix:
        if record["source"] == "wildguardmix_copyright_violations":
            continue
        label = int(record["label"] == "harmful")
        found.add(record["text"], label, f"wildguardmix-{'harmful' if label else 'safe'}")
    # Everyday requests in the instruction style the harmful sets share.
    if config.extra_data_dir:
        everyday = Path(config.extra_data_dir) / "everyday_prompts"
        for name in ("self_instruct_seed_tasks", "self_instruct_user_oriented_instructions"):
            for record in read_jsonl(everyday / f"{name}.jsonl"):
                given = record["instances"][0]["input"] if record.get("instances") else ""
                found.add(f"{record['instruction']}\n\n{given}".strip(), 0, "self-instruct")
        for name in ("mt_bench", "vicuna_bench"):
            for record in read_jsonl(everyday / f"{name}_question.jsonl"):
                found.add(record["turns"][0], 0, name.replace("_", "-"))
    # Ordinary questions.
    gsm = read_jsonl(data / "math_benchmarks" / "gsm8k_test.jsonl")
    for record in rng.sample(gsm, min(config.gsm8k_questions, len(gsm))):
        found.add(record["question"], 0, "gsm8k")
    problems = read_jsonl(data / "math_benchmarks" / "math500_test.jsonl")
    for record in rng.sample(problems, min(config.math500_questions, len(problems))):
        found.add(record["problem"], 0, "math500")
    return found


def example_weights(requests: Sequence[Request], balance: float) -> Array:
    """Each class carries half the weight; within it, source s carries n_s ** balance."""
    sizes = Counter((r.label, r.source) for r in requests)
    totals: dict[int, float] = {}
    for (label, _), n in sizes.items():
        totals[label] = totals.get(label, 0.0) + n ** balance
    return np.array([0.5 * sizes[(r.label, r.source)] ** (balance - 1) / totals[r.label]
                     for r in requests])


def fold_of(request: Request, folds: int, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:fold:{request.group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def lowest_threshold(benign_scores: Sequence[float], max_fpr: float) -> float:
    """The lowest threshold (so the most recall) that flags at most ``max_fpr`` of
    ``benign_scores``: a score is flagged when it reaches the threshold."""
    ordered = sorted(benign_scores, reverse=True)
    allowed = int(max_fpr * len(ordered))  # how many may be flagged
    if allowed >= len(ordered):
        return 0.0
    # The first 4-decimal value above the highest score that must stay unflagged.
    return (math.floor(ordered[allowed] * 1e4) + 1) / 1e4


def rate(flags: Sequence[bool]) -> dict[str, float | int]:
    flagged = sum(flags)
    return {"rate": round(flagged / len(flags), 4) if flags else 0.0, "flagged": flagged,
            "n": len(flags)}


def evaluate(requests: Sequence[Request], scores: Array, threshold: float) -> dict[str, Any]:
    truth = [r.label for r in requests]
    flags = [bool(s >= threshold) for s in scores]
    result: dict[str, Any] = {
        "requests": prf(truth, [int(f) for f in flags])
        | {"auroc": auroc(truth, [float(s) for s in scores])},
        "look_alike_fpr": rate([f for r, f in zip(requests, flags, strict=True)
                                if r.source in LOOK_ALIKES]),
    }
    for source in sorted({r.source for r in requests}):
        chosen = [f for r, f in zip(requests, flags, strict=True) if r.source == source]
        label = next(r.label for r in requests if r.source == source)
        result[f"{source}_{'tpr' if label else 'fpr'}"] = rate(chosen)
    return result


@dataclass(frozen=True)
class Candidate:
    l2: float
    balance: float
    threshold: float
    out_of_fold: dict[str, Any]

    @property
    def rank(self) -> tuple[float, float]:
        metrics = self.out_of_fold["requests"]
        return (metrics["recall"], metrics["auroc"])


def cross_validate(features: npt.NDArray[np.float32], requests: Sequence[Request], l2: float,
                   balance: float, config: TrainRequestHeadConfig) -> Candidate:
    """Out-of-fold scores for every request, the threshold they give, and their metrics."""
    labels = np.array([r.label for r in requests], dtype=np.float64)
    fold = np.array([fold_of(r, config.folds, config.seed) for r in requests])
    scores = np.zeros(len(requests))
    for k in range(config.folds):
        fit, held = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        weights, bias = fit_logistic(features[fit], labels[fit],
                                     example_weights([requests[int(i)] for i in fit], balance),
                                     l2, config.max_iter, config.seed)
        scores[held] = 1.0 / (1.0 + np.exp(-(features[held].astype(np.float64) @ weights
                                               + bias)))
    threshold = lowest_threshold(
        [float(s) for r, s in zip(requests, scores, strict=True) if r.source in LOOK_ALIKES],
        config.max_val_fpr)
    return Candidate(l2, balance, threshold, evaluate(requests, scores, threshold))


def grid(values: str) -> list[float]:
    return [float(value) for value in values.split(",") if value.strip()]


def main(config: TrainRequestHeadConfig) -> dict[str, Any]:
    from guardrail.guards.embedded.encoder import (
        DEFAULT_ENCODER_NAME,
        default_encoder_path,
        load_encoder,
    )

    started = time.perf_counter()
    found = collect(config)
    requests = found.requests
    splits = Counter((r.split, r.label) for r in requests)
    print(f"{len(requests)} requests from {dict(sorted(found.counts.items()))}; duplicates "
          f"dropped {dict(sorted(found.duplicates.items()))}", file=sys.stderr)
    print("split/label counts:", dict(sorted(splits.items())), file=sys.stderr)

    folder = Path(config.encoder) if config.encoder else default_encoder_path()
    encoder = load_encoder(folder)
    fingerprint = encoder_fingerprint(folder)
    encode_requests = DiskCachedEncode(
        lambda texts: encoder.encode(texts, max_length=config.request_max_tokens,
                                     truncation="left"),
        Path(config.cache_dir) / f"{fingerprint}-requests-left{config.request_max_tokens}.npz",
        "request")
    name = DEFAULT_ENCODER_NAME if config.encoder is None else folder.name

    def head_with(weights: Array, bias: float, threshold: float,
                  metadata: dict[str, Any] | None = None) -> LinearHead:
        return LinearHead(blocks=("request",), dim=encoder.dim, weights=weights, bias=bias,
                          threshold=threshold, encoder=name,
                          request_max_tokens=config.request_max_tokens,
                          step_max_tokens=encoder.max_length, metadata=metadata or {})

    # The guard's own featurizer (a request-only head never encodes a step).
    featurizer = ViewFeaturizer(head_with(np.zeros(encoder.dim), 0.0, 0.5), encoder.encode,
                                encode_requests, memory=None)
    views = [GuardView(request=r.text, context=(), step="") for r in requests]
    chunk = 512
    features = np.concatenate([featurizer.features(views[i : i + chunk])
                               for i in range(0, len(views), chunk)])

    train = [i for i, r in enumerate(requests) if r.split == "train"]
    test = [i for i, r in enumerate(requests) if r.split == "test"]
    fitted = [requests[i] for i in train]
    candidates = [cross_validate(features[train], fitted, l2, balance, config)
                  for l2 in grid(config.l2) for balance in grid(config.source_balance)]
    for candidate in candidates:
        metrics = candidate.out_of_fold["requests"]
        print(f"  l2={candidate.l2} balance={candidate.balance}: threshold "
              f"{candidate.threshold:.4f}, out-of-fold recall {metrics['recall']}, "
              f"AUROC {metrics['auroc']}", file=sys.stderr)
    chosen = max(candidates, key=lambda candidate: candidate.rank)
    weights, bias = fit_logistic(
        features[train], np.array([r.label for r in fitted], dtype=np.float64),
        example_weights(fitted, chosen.balance), chosen.l2, config.max_iter, config.seed)
    scores = head_with(weights, bias, chosen.threshold).scores(features[test])
    report = {
        "threshold": chosen.threshold,
        "chosen": {"l2": chosen.l2, "source_balance": chosen.balance},
        "candidates": [{"l2": c.l2, "source_balance": c.balance, "threshold": c.threshold,
                        "out_of_fold_recall": c.out_of_fold["requests"]["recall"],
                        "out_of_fold_auroc": c.out_of_fold["requests"]["auroc"]}
                       for c in candidates],
        "out_of_fold": chosen.out_of_fold,
        "test": evaluate([requests[i] for i in test], scores, chosen.threshold),
    }
    seconds = time.perf_counter() - started
    metadata = {
        "trained_with": command_line(config, "offline.train_request_head"),
        "config": {k: v for k, v in asdict(config).items()
                   if k not in ("data_dir", "extra_data_dir", "output_dir", "cache_dir", "save")},
        "encoder_fingerprint": fingerprint,
        "source_records": dict(sorted(found.counts.items())),
        "duplicates_dropped": dict(sorted(found.duplicates.items())),
        "examples": {f"{s}/{'harmful' if y else 'benign'}": n
                     for (s, y), n in sorted(splits.items())},
        "metrics": report,
        "seconds": {"total": round(seconds, 1), "encoding": round(encode_requests.seconds, 1)},
    }
    head = head_with(weights, bias, chosen.threshold, metadata)
    print(json.dumps(report, indent=1))
    print(f"done in {seconds:.0f}s (encoding {encode_requests.seconds:.0f}s, "
          f"{encode_requests.encoded} texts newly encoded)", file=sys.stderr)
    if config.save:
        print(f"wrote {head.save(config.output_dir, REQUEST_HEAD_FILE)}", file=sys.stderr)
    return metadata


def parse_args(argv: Iterable[str] | None = None) -> TrainRequestHeadConfig:
    return parse_config(TrainRequestHeadConfig, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    main(parse_args())
