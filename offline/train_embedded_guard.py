"""Train the embedded guard's head: logistic regression on frozen all-MiniLM-L6-v2 embeddings.

The guard judges response STEPS (sentences of reasoning or answer) seen with the user's request
and the few steps before them, so the training examples are built as exactly those views
(``GuardView``), split into steps by the proxy's own ``StepSplitter`` and turned into features by
the same ``ViewFeaturizer`` the guard uses at inference:

- positives: steps of real model responses that JailbreakBench's judge labelled jailbroken
  (attack artifacts, MIT);
- negatives: steps of responses labelled not jailbroken (refusals, off-target answers), STAR-1's
  safe reasoning and answers to harmful questions (Apache-2.0), GSM8K solutions (MIT);
- request probes (a request shown as its own step, weighted down): harmful requests from
  HarmBench, AdvBench, StrongREJECT, JBB, WildJailbreak and OR-Bench-toxic as positives, benign
  look-alikes from OR-Bench-hard, JBB-benign and WildJailbreak-benign as negatives. XSTest is
  never trained on: it is the held-out over-refusal probe.

Splits are by source prompt (JBB behaviour, STAR-1 id, WildJailbreak seed, ...) so that the same
behaviour never sits on both sides. The threshold is the one that maximises response-level F1
(a response is flagged when any checked step is) on the validation split; test metrics are
printed and stored in the head's metadata.

    python -m offline.train_embedded_guard --data-dir ../shared/data

``--export-heldout DIR`` writes the test split, by the same ``split_of`` and seed, as input for
``guardrail check`` instead of training (see ``export_heldout``).

Only Llama-licence-free sources are read (MIT, Apache-2.0, CC-BY-4.0, ODC-BY).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from guardrail.guards.base import GuardView
from guardrail.guards.embedded.head import BLOCKS, LinearHead, ViewFeaturizer
from guardrail.steps import StepSplitter

MAX_REQUEST_CHARS = 2000  # GuardConfig.max_request_chars' default: the proxy keeps the tail.
MODERATION_CATEGORIES = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")

Array = npt.NDArray[np.float64]


class SplitSettings(Protocol):
    """What ``split_of`` needs of a training configuration (shared with the request head's)."""

    seed: int
    val_fraction: float
    test_fraction: float


ConfigT = TypeVar("ConfigT")


@dataclass
class TrainEmbeddedGuardConfig:
    data_dir: str = "../shared/data"
    """A folder laid out like the project's shared data (one sub-folder per source)."""
    output_dir: str = "guardrail/guards/embedded/weights"
    cache_dir: str = str(Path(tempfile.gettempdir()) / "guardrail-embedded-guard-cache")
    """Embeddings are cached here (keyed by encoder and text), so reruns take seconds."""
    encoder: str | None = None
    """Encoder folder; None is the packaged all-MiniLM-L6-v2."""
    seed: int = 0
    blocks: str = "step,context,request,step*request"
    """Feature blocks, comma-separated, from: step, context, request, step*request,
    step*context."""
    window_steps: int = 4
    """Earlier steps in each view, as GuardConfig.window_steps."""
    request_max_tokens: int = 64
    first_steps: int = 3
    """Steps judged per response from the start of its reasoning and of its answer (the harmful
    part of a jailbroken answer starts early) ..."""
    last_steps: int = 0
    """... and from its end (STAR-1's final answers)."""
    star1_responses: int = 300
    gsm8k_responses: int = 150
    wildjailbreak_harmful: int = 200
    or_bench_toxic: int = 300
    moderation: int = 600
    probe_weight: float = 1.0
    """Total weight of the request probes relative to the response steps."""
    l2: float = 0.1
    max_iter: int = 300
    max_val_fpr: float = 0.05
    """The threshold may flag at most this share of the validation split's safe responses and
    benign requests."""
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    save: bool = True
    export_heldout: str | None = None
    """A folder: write the held-out test split as ``guardrail check`` input (JSON lines) there,
    and stop: nothing is trained or saved."""


# -- examples ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    view: GuardView
    label: int
    source: str
    kind: str  # "step" (a step of a real response) or "probe" (a request judged as text)
    unit: str  # the response (or probe) it belongs to: response-level metrics group by it
    split: str


def split_of(group: str, config: SplitSettings) -> str:
    """A stable split for a source prompt: the same group always lands on the same side."""
    digest = hashlib.sha256(f"{config.seed}:{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < config.test_fraction:
        return "test"
    if u < config.test_fraction + config.val_fraction:
        return "val"
    return "train"


def split_steps(text: str) -> list[str]:
    splitter = StepSplitter("sentence")
    steps = [*splitter.feed(text), *splitter.finish()]
    return [step for step in steps if step.strip()]


def response_examples(
    request: str,
    parts: Sequence[tuple[str, str]],
    label: int,
    source: str,
    unit: str,
    split: str,
    config: TrainEmbeddedGuardConfig,
) -> list[Example]:
    """Views of a response's first and last steps, each with the steps before it as context."""
    steps: list[tuple[str, str]] = []
    chosen_set: set[int] = set()
    for channel, text in parts:  # the opening steps of each part: reasoning, then answer
        part = split_steps(text)
        chosen_set.update(range(len(steps), len(steps) + min(config.first_steps, len(part))))
        steps += [(channel, step) for step in part]
    count = len(steps)
    chosen = sorted(chosen_set | set(range(max(0, count - config.last_steps), count)))
    texts = [step for _, step in steps]
    request = request[-MAX_REQUEST_CHARS:]
    examples = []
    for index in chosen:
        channel, step = steps[index]
        context = tuple(texts[max(0, index - config.window_steps) : index])
        view = GuardView(request=request, context=context, step=step,
                         channel="answer" if channel == "answer" else "reasoning")
        examples.append(Example(view, label, source, "step", unit, split))
    return examples


def probe(text: str, label: int, source: str, group: str,
          config: TrainEmbeddedGuardConfig, split: str | None = None) -> Example:
    request = text[-MAX_REQUEST_CHARS:]
    view = GuardView(request=request, context=(), step=text, channel="answer")
    unit = f"{source}:{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    return Example(view, label, source, "probe", unit, split or split_of(group, config))


def opener(request: str, target: str, label: int, source: str, group: str,
           split: str) -> Example:
    """The first step of an answer that complies with ``request``."""
    view = GuardView(request=request[-MAX_REQUEST_CHARS:], context=(), step=target,
                     channel="answer")
    unit = f"{source}:{hashlib.sha1(group.encode()).hexdigest()[:12]}"
    return Example(view, label, source, "probe", unit, split)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def think_parts(response: str) -> list[tuple[str, str]]:
    """(channel, text) of a ``<think>...</think> answer`` response."""
    match = re.match(r"\s*<think>(.*?)</think>(.*)", response, flags=re.S)
    if not match:
        return [("answer", response)]
    return [("reasoning", match.group(1)), ("answer", match.group(2))]


def collect(config: TrainEmbeddedGuardConfig) -> tuple[list[Example], Counter[str]]:
    data = Path(config.data_dir)
    if not data.is_dir():
        raise SystemExit(f"{data}: no data folder (see --data-dir)")
    rng = random.Random(config.seed)
    examples: list[Example] = []
    counts: Counter[str] = Counter()  # source records used

    # JailbreakBench attack artifacts: real responses with the JBB judge's label.
    for file in sorted((data / "jailbreakbench" / "attack-artifacts").glob("*/*/*.json")):
        records = json.loads(file.read_text(encoding="utf-8")).get("jailbreaks", [])
        for record in records:
            if not record.get("response"):
                continue
            behaviour = f"jbb:{record['index']}"
            label = int(bool(record["jailbroken"]))
            request = record.get("prompt") or record["goal"]
            unit = f"{file.parent.parent.name}/{file.stem}/{record['index']}"
            counts[f"jbb-artifacts-{'jailbroken' if label else 'not-jailbroken'}"] += 1
            examples += response_examples(request, [("answer", record["response"])], label,
                                          "jbb-response", unit, split_of(behaviour, config),
                                          config)

    # STAR-1: safe reasoning and answers to harmful questions.
    star = json.loads((data / "star1" / "STAR-1.json").read_text(encoding="utf-8"))
    for record in rng.sample(star, min(config.star1_responses, len(star))):
        counts["star1"] += 1
        group = f"star1:{record['id']}"
        examples += response_examples(record["question"], think_parts(record["response"]), 0,
                                      "star1", group, split_of(group, config), config)

    # GSM8K worked solutions: ordinary benign reasoning.
    gsm = read_jsonl(data / "math_benchmarks" / "gsm8k_test.jsonl")
    for number, record in enumerate(rng.sample(gsm, min(config.gsm8k_responses, len(gsm)))):
        counts["gsm8k"] += 1
        solution = re.sub(r"<<[^>]*>>", "", record["answer"]).replace("#### ", "The answer is ")
        group = f"gsm8k:{number}"
        examples += response_examples(record["question"], [("reasoning", solution)], 0,
                                      "gsm8k", group, split_of(group, config), config)

    # Request probes. JBB harmful and benign rows share topics row by row: split them together.
    # Their targets ("Sure, here is ...") are the first step of a complying answer: harmful
    # when the request is, benign when it is not, which teaches "compliance with what".
    for name, label in (("harmful-behaviors.csv", 1), ("benign-behaviors.csv", 0)):
        kind = "harmful" if label else "benign"
        for row in read_csv(data / "jailbreakbench" / name):
            index = row.get("Index", row.get("index"))
            goal = row.get("Goal", row.get("goal", ""))
            target = row.get("Target", row.get("target", ""))
            split = split_of(f"jbb:{index}", config)
            counts[f"jbb-{kind}-behaviours"] += 1
            examples.append(probe(goal, label, f"jbb-{kind}", f"jbb:{index}", config, split))
            examples.append(opener(goal, target, label, f"jbb-{kind}-target", f"jbb:{index}",
                                   split))
    for row in read_csv(data / "harmbench" / "harmbench_behaviors_text_all.csv"):
        if row["FunctionalCategory"] == "standard":
            counts["harmbench-standard"] += 1
            examples.append(probe(row["Behavior"], 1, "harmbench", row["BehaviorID"], config))
    for row in read_csv(data / "advbench" / "harmful_behaviors.csv"):
        counts["advbench"] += 1
        examples.append(probe(row["goal"], 1, "advbench", row["goal"], config))
        examples.append(opener(row["goal"], row["target"], 1, "advbench-target", row["goal"],
                               split_of(row["goal"], config)))
    for row in read_csv(data / "strongreject" / "strongreject_dataset.csv"):
        counts["strongreject"] += 1
        examples.append(probe(row["forbidden_prompt"], 1, "strongreject",
                              row["forbidden_prompt"], config))
    wjb = read_jsonl(data / "wildjailbreak" / "wildjailbreak_eval_adversarial_harmful.jsonl")
    for row in rng.sample(wjb, min(config.wildjailbreak_harmful, len(wjb))):
        counts["wildjailbreak-harmful"] += 1
        examples.append(probe(row["adversarial"], 1, "wildjailbreak-harmful", row["vanilla"],
                              config))
    for row in read_jsonl(data / "wildjailbreak" / "wildjailbreak_eval_adversarial_benign.jsonl"):
        counts["wildjailbreak-benign"] += 1
        examples.append(probe(row["adversarial"], 0, "wildjailbreak-benign", row["vanilla"],
                              config))
    toxic = read_csv(data / "or_bench" / "or_bench-toxic.csv")
    for row in rng.sample(toxic, min(config.or_bench_toxic, len(toxic))):
        counts["or-bench-toxic"] += 1
        examples.append(probe(row["prompt"], 1, "or-bench-toxic", row["prompt"], config))
    for row in read_csv(data / "or_bench" / "or_bench-hard-1k.csv"):
        counts["or-bench-hard"] += 1
        examples.append(probe(row["prompt"], 0, "or-bench-hard", row["prompt"], config))
    # OpenAI moderation evaluation set: user-written text, unsafe if any category is marked.
    moderation = read_jsonl(
        data / "openai_moderation" / "openai_moderation_evaluation_dataset.jsonl")
    for record in rng.sample(moderation, min(config.moderation, len(moderation))):
        label = int(any(record.get(key) == 1 for key in MODERATION_CATEGORIES))
        kind = "unsafe" if label else "safe"
        counts[f"openai-moderation-{kind}"] += 1
        examples.append(probe(record["prompt"], label, f"openai-moderation-{kind}",
                              record["prompt"], config))
    # XSTest: held out entirely (test only), never trained on.
    for row in read_csv(data / "xstest" / "xstest_prompts.csv"):
        label = int(row["label"] == "unsafe")
        counts[f"xstest-{row['label']}"] += 1
        examples.append(probe(row["prompt"], label, f"xstest-{row['label']}", row["id"], config,
                              "test"))
    return examples, counts


# -- the held-out split as ``guardrail check`` input ---------------------------------------------


def heldout_rows(config: TrainEmbeddedGuardConfig) -> dict[str, list[dict[str, Any]]]:
    """The test split's rows, per file, as ``{"prompt", "response", "label"}`` lines.

    ``responses``: JBB attack-artifact responses whose behaviour is in the test split (the
    request as ``collect`` gives it, the whole response, the JBB judge's label). The look-alike
    sets are judged as the datasheet judged them: a prompt shown as its own step, i.e. prompt =
    response = the prompt (``probe``'s view); XSTest safe is all test, OR-Bench hard only its
    test part."""
    data = Path(config.data_dir)
    if not data.is_dir():
        raise SystemExit(f"{data}: no data folder (see --data-dir)")
    responses: list[dict[str, Any]] = []
    for file in sorted((data / "jailbreakbench" / "attack-artifacts").glob("*/*/*.json")):
        for record in json.loads(file.read_text(encoding="utf-8")).get("jailbreaks", []):
            if not record.get("response"):
                continue
            if split_of(f"jbb:{record['index']}", config) != "test":
                continue
            responses.append({
                "id": f"{file.parent.parent.name}/{file.stem}/{record['index']}",
                "prompt": record.get("prompt") or record["goal"],
                "response": record["response"],
                "label": "unsafe" if record["jailbroken"] else "safe",
            })
    xstest = [{"id": row["id"], "prompt": row["prompt"], "response": row["prompt"],
               "label": "safe"}
              for row in read_csv(data / "xstest" / "xstest_prompts.csv")
              if row["label"] == "safe"]
    or_bench = [{"prompt": row["prompt"], "response": row["prompt"], "label": "safe"}
                for row in read_csv(data / "or_bench" / "or_bench-hard-1k.csv")
                if split_of(row["prompt"], config) == "test"]
    return {"responses": responses, "xstest_safe": xstest, "or_bench_hard": or_bench}


def export_heldout(config: TrainEmbeddedGuardConfig, folder: Path) -> dict[str, int]:
    """Writes ``heldout_rows`` as ``NAME.jsonl`` files in ``folder``; returns the line counts."""
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name, rows in heldout_rows(config).items():
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts[name] = len(rows)
        print(f"wrote {folder / f'{name}.jsonl'} ({len(rows)} lines)", file=sys.stderr)
    return counts


# -- embeddings, cached on disk ----------------------------------------------------------------


def encoder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".bin", ".txt"):
            digest.update(file.relative_to(folder).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


class DiskCachedEncode:
    """An encode function that remembers every embedding in one ``.npz`` file."""

    def __init__(self, encode: Any, file: Path, label: str) -> None:
        self._encode = encode
        self.file = file
        self.label = label
        self._table: dict[str, npt.NDArray[np.float32]] = {}
        self.encoded = 0
        self.seconds = 0.0
        if file.is_file():
            with np.load(file) as stored:
                self._table = dict(zip(stored["keys"].tolist(), stored["vectors"], strict=True))

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def __call__(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        keys = [self.key(text) for text in texts]
        missing = [text for text, key in zip(texts, keys, strict=True) if key not in self._table]
        if missing:
            start = time.perf_counter()
            vectors = self._encode(missing)
            self.seconds += time.perf_counter() - start
            self.encoded += len(missing)
            for text, vector in zip(missing, vectors, strict=True):
                self._table[self.key(text)] = vector
            self.save()
            print(f"  encoded {self.encoded} {self.label} texts ({self.seconds:.0f}s)",
                  file=sys.stderr, flush=True)
        return np.stack([self._table[key] for key in keys])

    def save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.file.with_suffix(".tmp.npz")
        np.savez(temporary, keys=np.array(list(self._table)),
                 vectors=np.stack(list(self._table.values())))
        temporary.replace(self.file)


# -- logistic regression -----------------------------------------------------------------------


def fit_logistic(x: npt.NDArray[np.float32], y: Array, weight: Array, l2: float,
                 max_iter: int, seed: int) -> tuple[Array, float]:
    """Weighted, L2-regularised logistic regression (L-BFGS, standardised features); returns
    weights and bias for the raw features."""
    import torch

    torch.manual_seed(seed)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6
    xs = torch.from_numpy(((x - mean) / std).astype(np.float32))
    ys = torch.from_numpy(y.astype(np.float32))
    ws = torch.from_numpy((weight / weight.sum()).astype(np.float32))
    beta = torch.zeros(xs.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([beta, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = xs @ beta + bias
        losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, ys,
                                                                      reduction="none")
        loss = (losses * ws).sum() + l2 * (beta * beta).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimiser.step(closure)  # type: ignore[no-untyped-call]
    scaled = beta.detach().numpy().astype(np.float64) / std
    raw_bias = float(bias.detach().numpy()[0]) - float(scaled @ mean)
    return scaled, raw_bias


def class_weights(examples: Sequence[Example], probe_weight: float) -> Array:
    """Each class carries half the weight within each kind; probes carry ``probe_weight`` of
    what the response steps carry."""
    totals = Counter((example.kind, example.label) for example in examples)
    kind_weight = {"step": 1.0, "probe": probe_weight}
    return np.array([kind_weight[example.kind] * 0.5 / totals[(example.kind, example.label)]
                     for example in examples])


# -- metrics -----------------------------------------------------------------------------------


def prf(truth: Sequence[int], predicted: Sequence[int]) -> dict[str, float]:
    tp = sum(1 for t, p in zip(truth, predicted, strict=True) if t and p)
    fp = sum(1 for t, p in zip(truth, predicted, strict=True) if not t and p)
    fn = sum(1 for t, p in zip(truth, predicted, strict=True) if t and not p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "positives": sum(truth), "negatives": len(truth) - sum(truth)}


def auroc(truth: Sequence[int], scores: Sequence[float]) -> float:
    pairs = sorted(zip(scores, truth, strict=True))
    ranks = np.empty(len(pairs))
    index = 0
    while index < len(pairs):  # average ranks over ties
        end = index
        while end + 1 < len(pairs) and pairs[end + 1][0] == pairs[index][0]:
            end += 1
        ranks[index : end + 1] = (index + end) / 2 + 1
        index = end + 1
    positives = sum(t for _, t in pairs)
    negatives = len(pairs) - positives
    if not positives or not negatives:
        return float("nan")
    rank_sum = sum(rank for rank, (_, t) in zip(ranks, pairs, strict=True) if t)
    return round((rank_sum - positives * (positives + 1) / 2) / (positives * negatives), 4)


def by_unit(examples: Sequence[Example], scores: Array) -> tuple[list[int], list[float], list[str]]:
    """Response-level view: a response is as unsafe as its most unsafe checked step."""
    best: dict[str, float] = {}
    label: dict[str, int] = {}
    source: dict[str, str] = {}
    for example, score in zip(examples, scores, strict=True):
        best[example.unit] = max(best.get(example.unit, 0.0), float(score))
        label[example.unit] = example.label
        source[example.unit] = example.source
    units = sorted(best)
    return [label[u] for u in units], [best[u] for u in units], [source[u] for u in units]


def best_threshold(truth: Sequence[int], scores: Sequence[float],
                   safe_scores: Sequence[float], max_fpr: float) -> float:
    """The threshold with the best response-level F1 among those that flag at most ``max_fpr``
    of the safe units (safe responses and benign request probes): F1 alone would let the many
    jailbroken responses buy recall with false positives on benign text."""
    candidates = sorted(set(round(s, 4) for s in [*scores, *safe_scores]))
    best: tuple[float, float] | None = None
    for candidate in candidates:
        flagged = sum(s >= candidate for s in safe_scores)
        if safe_scores and flagged / len(safe_scores) > max_fpr:
            continue
        f1 = prf(truth, [int(s >= candidate) for s in scores])["f1"]
        if best is None or f1 > best[0]:
            best = (f1, candidate)
    return best[1] if best is not None else 1.0


def evaluate(examples: Sequence[Example], scores: Array, threshold: float) -> dict[str, Any]:
    steps = [i for i, e in enumerate(examples) if e.kind == "step"]
    step_truth = [examples[i].label for i in steps]
    step_scores = [float(scores[i]) for i in steps]
    jbb = [i for i in steps if examples[i].source == "jbb-response"]
    truth, unit_scores, _ = by_unit([examples[i] for i in jbb], scores[jbb])
    result: dict[str, Any] = {
        "jbb_responses": prf(truth, [int(s >= threshold) for s in unit_scores])
        | {"auroc": auroc(truth, unit_scores)},
        "jbb_steps": prf([examples[i].label for i in jbb],
                         [int(scores[i] >= threshold) for i in jbb])
        | {"auroc": auroc([examples[i].label for i in jbb], [float(scores[i]) for i in jbb])},
        "all_steps_auroc": auroc(step_truth, step_scores),
    }
    for source in ("star1", "gsm8k"):
        chosen = [i for i in steps if examples[i].source == source]
        if chosen:
            _, unit_scores, _ = by_unit([examples[i] for i in chosen], scores[chosen])
            flagged = sum(s >= threshold for s in unit_scores)
            result[f"{source}_response_fpr"] = {"rate": round(flagged / len(unit_scores), 4),
                                                 "flagged": flagged, "n": len(unit_scores)}
    probes = Counter(e.source for e in examples if e.kind == "probe")
    for source in sorted(probes):
        chosen = [i for i, e in enumerate(examples) if e.kind == "probe" and e.source == source]
        flagged = sum(scores[i] >= threshold for i in chosen)
        key = "tpr" if examples[chosen[0]].label else "fpr"
        result[f"probe_{source}_{key}"] = {"rate": round(flagged / len(chosen), 4),
                                           "flagged": int(flagged), "n": len(chosen)}
    return result


# -- main --------------------------------------------------------------------------------------


def main(config: TrainEmbeddedGuardConfig) -> dict[str, Any]:
    from guardrail.guards.embedded.encoder import (
        DEFAULT_ENCODER_NAME,
        default_encoder_path,
        load_encoder,
    )

    if config.export_heldout:
        return {"exported": export_heldout(config, Path(config.export_heldout))}
    started = time.perf_counter()
    blocks = tuple(block.strip() for block in config.blocks.split(",") if block.strip())
    unknown = [block for block in blocks if block not in BLOCKS]
    if unknown:
        raise SystemExit(f"unknown blocks {unknown}; known: {', '.join(BLOCKS)}")
    examples, counts = collect(config)
    splits = Counter((e.split, e.kind, e.label) for e in examples)
    print(f"{len(examples)} examples from {dict(sorted(counts.items()))}", file=sys.stderr)
    print("split/kind/label counts:", dict(sorted(splits.items())), file=sys.stderr)

    folder = Path(config.encoder) if config.encoder else default_encoder_path()
    encoder = load_encoder(folder)
    fingerprint = encoder_fingerprint(folder)
    cache = Path(config.cache_dir)
    encode_steps = DiskCachedEncode(
        lambda texts: encoder.encode(texts),
        cache / f"{fingerprint}-steps-{encoder.max_length}.npz", "step")
    encode_requests = DiskCachedEncode(
        lambda texts: encoder.encode(texts, max_length=config.request_max_tokens,
                                     truncation="left"),
        cache / f"{fingerprint}-requests-left{config.request_max_tokens}.npz", "request")
    # A placeholder head fixes the blocks; its weights are what training replaces.
    shape = LinearHead(blocks=blocks, dim=encoder.dim, weights=np.zeros(len(blocks) * encoder.dim),
                       bias=0.0, threshold=0.5, encoder=DEFAULT_ENCODER_NAME,
                       request_max_tokens=config.request_max_tokens,
                       step_max_tokens=encoder.max_length)
    featurizer = ViewFeaturizer(shape, encode_steps, encode_requests, memory=None)
    chunk = 512
    features = np.concatenate([featurizer.features([e.view for e in examples[i : i + chunk]])
                               for i in range(0, len(examples), chunk)])
    encode_seconds = encode_steps.seconds + encode_requests.seconds

    part = {name: [i for i, e in enumerate(examples) if e.split == name]
            for name in ("train", "val", "test")}
    train = [examples[i] for i in part["train"]]
    weights, bias = fit_logistic(
        features[part["train"]], np.array([e.label for e in train], dtype=np.float64),
        class_weights(train, config.probe_weight), config.l2, config.max_iter, config.seed)
    head = LinearHead(blocks=blocks, dim=encoder.dim, weights=weights, bias=bias, threshold=0.5,
                      encoder=DEFAULT_ENCODER_NAME if config.encoder is None else folder.name,
                      request_max_tokens=config.request_max_tokens,
                      step_max_tokens=encoder.max_length)
    scores = head.scores(features)

    val = [examples[i] for i in part["val"]]
    truth, unit_scores, _ = by_unit(val, scores[part["val"]])
    kinds = {e.unit: e.kind for e in val}
    units = sorted(kinds)
    response = [i for i, unit in enumerate(units) if kinds[unit] == "step"]
    safe = [unit_scores[i] for i, unit in enumerate(units) if not truth[i]]
    threshold = best_threshold([truth[i] for i in response], [unit_scores[i] for i in response],
                               safe, config.max_val_fpr)
    report = {
        "threshold": threshold,
        "val": evaluate([examples[i] for i in part["val"]], scores[part["val"]], threshold),
        "test": evaluate([examples[i] for i in part["test"]], scores[part["test"]], threshold),
    }
    seconds = time.perf_counter() - started
    metadata = {
        "trained_with": command_line(config),
        "config": {k: v for k, v in asdict(config).items()
                   if k not in ("data_dir", "output_dir", "cache_dir", "save", "export_heldout")},
        "encoder_fingerprint": fingerprint,
        "source_records": dict(sorted(counts.items())),
        "examples": {f"{s}/{k}/{'unsafe' if y else 'safe'}": n
                     for (s, k, y), n in sorted(splits.items())},
        "metrics": report,
        "seconds": {"total": round(seconds, 1), "encoding": round(encode_seconds, 1)},
    }
    head = LinearHead(blocks=head.blocks, dim=head.dim, weights=head.weights, bias=head.bias,
                      threshold=threshold, encoder=head.encoder,
                      request_max_tokens=head.request_max_tokens,
                      step_max_tokens=head.step_max_tokens, metadata=metadata)
    print(json.dumps(report, indent=1))
    print(f"done in {seconds:.0f}s (encoding {encode_seconds:.0f}s, "
          f"{encode_steps.encoded + encode_requests.encoded} texts newly encoded)",
          file=sys.stderr)
    if config.save:
        print(f"wrote {head.save(config.output_dir)}", file=sys.stderr)
    return metadata


def command_line(config: Any, module: str = "offline.train_embedded_guard") -> str:
    """The command that reproduces ``config`` (a dataclass; options left at their defaults are
    omitted)."""
    defaults = asdict(type(config)())
    options = [f"--{key.replace('_', '-')}={value}" for key, value in asdict(config).items()
               if value != defaults[key] and key not in ("cache_dir", "save", "export_heldout")]
    return " ".join([f"python -m {module}", *options])


def parse_config(config_type: type[ConfigT], description: str,
                 argv: Iterable[str] | None = None) -> ConfigT:
    """A dataclass of training options from the command line: one ``--flag`` per field."""
    defaults = config_type()
    parser = argparse.ArgumentParser(description=description)
    for spec in fields(defaults):  # type: ignore[arg-type]
        flag = "--" + spec.name.replace("_", "-")
        default = getattr(defaults, spec.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif default is None:
            parser.add_argument(flag, default=None)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return config_type(**vars(parser.parse_args(None if argv is None else list(argv))))


def parse_args(argv: Iterable[str] | None = None) -> TrainEmbeddedGuardConfig:
    return parse_config(TrainEmbeddedGuardConfig, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    main(parse_args())
