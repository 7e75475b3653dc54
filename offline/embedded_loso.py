"""Leave-one-source-out evaluation of the embedded guard: hold out a whole source, train on the
rest, test on it, with the threshold chosen on (a validation part of) the training sources only.

Responses: one fold per trainable response source (the JailbreakBench family — attack
artifacts and behaviour targets, which share their 100 behaviours — is one fold); the
evaluation-only sets (JBB judge comparison, JailbreakEval: human labels; Self-Instruct answers)
are never trained on, and are scored by the JailbreakBench fold's model too, since they share
JBB's behaviours. Requests (the request head): one fold per request source.

The same run measures the shipped heads ("today") on every source, as the proxy's
``guardrail check`` judges a response: the whole response as one step (its first 256 tokens),
the request's last 64 tokens.

    python -m offline.embedded_loso --data-dir ../shared/data --out loso.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from offline.embedded_data import Labelled, load_requests, load_responses
from offline.embedded_features import ResponseSet, embed_requests, embed_responses
from offline.embedded_finetune import FineTuneSettings
from offline.embedded_model import (
    Array,
    FitSettings,
    balanced_weights,
    choose_threshold,
    fit_linear,
    fit_mil,
    held_out,
    report,
    response_scores,
    sigmoid,
    window_features,
)
from offline.embedding_cache import EmbeddingCache

JBB_FAMILY = ("jbb-artifacts", "jbb-targets")


class ResponseRows(Protocol):
    """Response rows as a recipe needs them: cached embeddings (``ResponseSet``, the frozen
    recipe) or window texts (``WindowSet``, fine-tuning)."""

    @property
    def records(self) -> list[Labelled]: ...

    def subset(self, chosen: Sequence[int]) -> Any: ...


Rows = TypeVar("Rows", bound=ResponseRows)
Rows_contra = TypeVar("Rows_contra", contravariant=True)


class ScoringHead(Protocol[Rows_contra]):
    @property
    def threshold(self) -> float: ...

    def scores(self, data: Rows_contra) -> Array: ...


class ResponseRecipe(Protocol[Rows_contra]):
    """Trains a response head on rows and chooses its threshold on them alone."""

    def train(self, data: Rows_contra) -> ScoringHead[Rows_contra]: ...
RESPONSE_FPR = {"refusal": 0.02, "benign-answer": 0.02}
REQUEST_FPR = {"everyday": 0.01, "lookalike": 0.10}


@dataclass(frozen=True)
class HeadRecipe:
    blocks: tuple[str, ...] = ("step",)
    fit: FitSettings = field(default_factory=FitSettings)
    val_fraction: float = 0.2
    max_fpr: dict[str, float] = field(default_factory=lambda: dict(RESPONSE_FPR))
    threshold_out_of_source: bool = True
    """Choose the threshold on out-of-source scores (else on a validation part)."""

    def train(self, data: ResponseSet) -> FittedResponseHead:
        if self.threshold_out_of_source:
            return fit_response_head_out_of_source(data, self)
        return fit_response_head(data, self)


@dataclass
class FittedResponseHead:
    blocks: tuple[str, ...]
    weights: Array
    bias: float
    threshold: float
    out_of_source: Array | None = None
    """Each training row's score by a head trained without its source (when the threshold was
    chosen that way)."""

    def scores(self, data: ResponseSet) -> Array:
        return response_scores(data, self.blocks, self.weights, self.bias)


def _fit_all(data: ResponseSet, recipe: HeadRecipe) -> FittedResponseHead:
    weights, bias = fit_mil(window_features(data, recipe.blocks), data.owner,
                            np.array([r.label for r in data.records], dtype=np.float64),
                            balanced_weights(data.records, recipe.fit.source_balance),
                            recipe.fit)
    return FittedResponseHead(recipe.blocks, weights, bias, 0.5)


def source_families(records: Sequence[Labelled]) -> list[tuple[str, ...]]:
    """The sources of ``records`` as held-out units (the JBB family together)."""
    present = sorted({r.source for r in records})
    family = tuple(source for source in JBB_FAMILY if source in present)
    return ([family] if family else []) + [(s,) for s in present if s not in JBB_FAMILY]


def fit_response_head_out_of_source(data: ResponseSet,
                                    recipe: HeadRecipe) -> FittedResponseHead:
    """Fit on all of ``data``; the threshold is chosen on out-of-source scores: each source
    scored by a head trained without it, so the threshold is one that held on sources the head
    had not seen (a head is surest of the style it was trained on; a threshold chosen there is
    too high for a new source)."""
    families = source_families(data.records)
    if len(families) < 3:  # too few sources to hold one out: the validation-part rule
        return fit_response_head(data, recipe)
    scores = np.zeros(len(data.records))
    for family in families:
        inside = [i for i, r in enumerate(data.records) if r.source in family]
        rest = [i for i, r in enumerate(data.records) if r.source not in family]
        scores[inside] = _fit_all(data.subset(rest), recipe).scores(data.subset(inside))
    head = _fit_all(data, recipe)
    head.threshold = choose_threshold(data.records, scores, recipe.max_fpr)
    head.out_of_source = scores
    return head


def fit_response_head(data: ResponseSet, recipe: HeadRecipe) -> FittedResponseHead:
    """Fit on the training part of ``data``'s groups, choose the threshold on the rest."""
    val = [i for i, r in enumerate(data.records)
           if held_out(r.group, recipe.fit.seed, recipe.val_fraction)]
    val_set = set(val)
    train = [i for i in range(len(data.records)) if i not in val_set]
    part = data.subset(train)
    weights, bias = fit_mil(window_features(part, recipe.blocks), part.owner,
                            np.array([r.label for r in part.records], dtype=np.float64),
                            balanced_weights(part.records, recipe.fit.source_balance),
                            recipe.fit)
    head = FittedResponseHead(recipe.blocks, weights, bias, 0.5)
    # A set too small to hold out both classes (a team's few rows): chosen on what it trained on.
    check = data.subset(val if _both_classes([data.records[i] for i in val]) else train)
    head.threshold = choose_threshold(check.records, head.scores(check), recipe.max_fpr)
    return head


@dataclass
class FittedRequestHead:
    weights: Array
    bias: float
    threshold: float

    def scores(self, vectors: np.ndarray) -> Array:
        return sigmoid(vectors.astype(np.float64) @ self.weights + self.bias)


def fit_request_head(records: Sequence[Labelled], vectors: np.ndarray, settings: FitSettings,
                     val_fraction: float = 0.2,
                     max_fpr: dict[str, float] | None = None) -> FittedRequestHead:
    val = np.array([held_out(r.group, settings.seed, val_fraction) for r in records])
    train = [r for r, v in zip(records, val, strict=True) if not v]
    weights, bias = fit_linear(vectors[~val],
                               np.array([r.label for r in train], dtype=np.float64),
                               balanced_weights(train, settings.source_balance), settings)
    head = FittedRequestHead(weights, bias, 0.5)
    checked = [r for r, v in zip(records, val, strict=True) if v]
    if not _both_classes(checked):
        val = ~val
        checked = train
    head.threshold = choose_threshold(checked, head.scores(vectors[val]),
                                      max_fpr if max_fpr is not None else dict(REQUEST_FPR))
    return head


def _both_classes(records: Sequence[Labelled]) -> bool:
    return len({record.label for record in records}) == 2


# -- folds --------------------------------------------------------------------------------------


def response_folds(records: Sequence[Labelled]) -> list[tuple[str, tuple[str, ...]]]:
    trainable = sorted({r.source for r in records if not r.eval_only})
    folds: list[tuple[str, tuple[str, ...]]] = [("jailbreakbench", JBB_FAMILY)]
    folds += [(source, (source,)) for source in trainable if source not in JBB_FAMILY]
    return folds


def loso_responses(data: Rows, recipe: ResponseRecipe[Rows],
                   progress: Callable[[str], None],
                   store: Path | None = None) -> dict[str, Any]:
    """Per held-out source: the report of the model trained without it; plus the evaluation-only
    sets scored by the all-sources model and by the JBB-family fold. With ``store``, each
    finished fold's results are kept there (``NAME.json``) and a rerun skips it."""
    records = data.records
    results: dict[str, Any] = {}
    eval_only = [i for i, r in enumerate(records) if r.eval_only]
    for name, sources in response_folds(records):
        kept = store / f"fold-{name}.json" if store is not None else None
        if kept is not None and kept.is_file():
            results |= json.loads(kept.read_text(encoding="utf-8"))
            progress(f"fold {name}: done before, kept in {kept}")
            continue
        started = time.perf_counter()
        before = set(results)
        train = [i for i, r in enumerate(records) if not r.eval_only and r.source not in sources]
        test = [i for i, r in enumerate(records) if r.source in sources]
        if not test:
            continue
        head = recipe.train(data.subset(train))
        tested = data.subset(test)
        results[name] = report(tested.records, head.scores(tested), head.threshold)
        results[name]["threshold"] = round(head.threshold, 4)
        if name == "jailbreakbench":  # the judge sets share JBB's behaviours: unseen here too
            for source in sorted({records[i].source for i in eval_only}):
                chosen = data.subset([i for i in eval_only if records[i].source == source])
                results[f"{source} (without JBB)"] = report(
                    chosen.records, head.scores(chosen), head.threshold)
        del head  # a fine-tuned fold's model goes before the next one is trained
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps({key: results[key] for key in results if key not in before}),
                            encoding="utf-8")
        progress(f"fold {name}: {time.perf_counter() - started:.0f}s")
    kept = store / "fold-_all-sources.json" if store is not None else None
    if kept is not None and kept.is_file():
        stored: dict[str, Any] = json.loads(kept.read_text(encoding="utf-8"))
        return results | stored
    before = set(results)
    head = recipe.train(data.subset([i for i, r in enumerate(records) if not r.eval_only]))
    for source in sorted({records[i].source for i in eval_only}):
        chosen = data.subset([i for i in eval_only if records[i].source == source])
        results[f"{source} (all sources)"] = report(chosen.records, head.scores(chosen),
                                                    head.threshold)
    results["_threshold_all_sources"] = round(head.threshold, 4)
    if kept is not None:
        kept.write_text(json.dumps({key: results[key] for key in results if key not in before}),
                        encoding="utf-8")
    return results


def fold_store(root: Path, recipe: dict[str, Any], records: Sequence[Labelled]) -> Path:
    """Where a LOSO run keeps its finished folds: a folder per recipe and data, so a rerun
    with other settings or rows starts afresh instead of reusing stale folds."""
    import hashlib

    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    for record in records:
        digest.update(f"{record.key}:{record.label}:{record.source}\n".encode())
    return root / f"loso-{digest.hexdigest()[:12]}"


def loso_requests(records: Sequence[Labelled], vectors: np.ndarray, settings: FitSettings,
                  progress: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    trainable = sorted({r.source for r in records if not r.eval_only})
    for source in trainable + sorted({r.source for r in records if r.eval_only}):
        train = np.array([not r.eval_only and r.source != source for r in records])
        test = np.array([r.source == source for r in records])
        head = fit_request_head([r for r, t in zip(records, train, strict=True) if t],
                                vectors[train], settings)
        tested = [r for r, t in zip(records, test, strict=True) if t]
        results[source] = report(tested, head.scores(vectors[test]), head.threshold)
        results[source]["threshold"] = round(head.threshold, 4)
        progress(f"request fold {source}")
    return results


# -- today's shipped heads ----------------------------------------------------------------------


def shipped_baseline(responses: Sequence[Labelled], requests: Sequence[Labelled],
                     cache: EmbeddingCache, folder: Path | None = None) -> dict[str, Any]:
    """The shipped step head judging each whole response as one step (first 256 tokens, as
    ``guardrail check`` does), and the shipped request head judging each request."""
    from guardrail.guards.embedded.guard import REQUEST_HEAD_FILE, SHIPPED_HEAD
    from guardrail.guards.embedded.head import load_head

    folder = folder or SHIPPED_HEAD
    out: dict[str, Any] = {"responses": {}, "requests": {}}
    if requests:
        request_head = load_head(folder / REQUEST_HEAD_FILE)
        vectors = cache.encode([r.prompt for r in requests], request_head.request_max_tokens,
                               "left", desc="requests")
        request_scores = request_head.scores(request_head.assemble(None, None, vectors))
        for source in sorted({r.source for r in requests}):
            chosen = [i for i, r in enumerate(requests) if r.source == source]
            out["requests"][source] = report([requests[i] for i in chosen],
                                             request_scores[chosen], request_head.threshold)
    if not responses:
        return out
    step_head = load_head(folder / "head.json")
    steps = cache.encode([r.response for r in responses], step_head.step_max_tokens, "right",
                         desc="whole responses")
    prompts = cache.encode([r.prompt for r in responses], step_head.request_max_tokens, "left",
                           desc="prompts (64)")
    features = step_head.assemble(steps, np.zeros_like(steps) if step_head.uses_context
                                  else None, prompts)
    step_scores = step_head.scores(features)
    for source in sorted({r.source for r in responses}):
        chosen = [i for i, r in enumerate(responses) if r.source == source]
        out["responses"][source] = report([responses[i] for i in chosen], step_scores[chosen],
                                          step_head.threshold)
    return out


# -- tables -------------------------------------------------------------------------------------


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "-" if value is None else f"{value:.3f}"


def _rate(row: dict[str, Any], role: str) -> str:
    value = row.get(f"flagged_{role}")
    if not isinstance(value, dict):
        return "-"
    return f"{100 * value['rate']:.1f} % ({value['flagged']}/{value['n']})"


def response_table(results: dict[str, Any], title: str) -> str:
    lines = [f"| {title} | n (harmful) | precision | recall | F1 | AUROC | harmful flagged "
             "| refusals flagged | benign answers flagged |", "|---" * 9 + "|"]
    for name, row in results.items():
        if name.startswith("_"):
            continue
        lines.append(f"| {name} | {row['n']} ({row['harmful']}) | {_cell(row, 'precision')} | "
                     f"{_cell(row, 'recall')} | {_cell(row, 'f1')} | {_cell(row, 'auroc')} | "
                     f"{_rate(row, 'harmful')} | {_rate(row, 'refusal')} | "
                     f"{_rate(row, 'benign-answer')} |")
    return "\n".join(lines)


def request_table(results: dict[str, Any], title: str) -> str:
    lines = [f"| {title} | n (harmful) | F1 | AUROC | harmful flagged | look-alikes flagged "
             "| everyday flagged |", "|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['n']} ({row['harmful']}) | {_cell(row, 'f1')} | "
                     f"{_cell(row, 'auroc')} | {_rate(row, 'harmful')} | "
                     f"{_rate(row, 'lookalike')} | {_rate(row, 'everyday')} |")
    return "\n".join(lines)


def pooled(results: dict[str, Any], names: Sequence[str], role: str) -> dict[str, float]:
    """Summed flagged / n of ``role`` over the named folds."""
    flagged = n = 0
    for name in names:
        value = results.get(name, {}).get(f"flagged_{role}")
        if isinstance(value, dict):
            flagged += value["flagged"]
            n += value["n"]
    return {"rate": round(flagged / n, 4) if n else 0.0, "flagged": flagged, "n": n}


def summary(responses: dict[str, Any], requests: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue names: cross-source F1 (mean over held-out sources that have both
    classes), refusals, benign answers and everyday requests flagged (pooled)."""
    folds = [name for name in responses if not name.startswith("_") and "all sources" not in name]
    f1 = {name: responses[name]["f1"] for name in folds if "f1" in responses[name]}
    return {
        "cross_source_f1": f1,
        "cross_source_f1_mean": round(float(np.mean(list(f1.values()))), 4) if f1 else None,
        "refusals_flagged": pooled(responses, folds, "refusal"),
        "benign_answers_flagged": pooled(responses, folds, "benign-answer"),
        "everyday_requests_flagged": pooled(requests, list(requests), "everyday"),
        "lookalike_requests_flagged": pooled(requests, list(requests), "lookalike"),
        "harmful_requests_flagged": pooled(requests, list(requests), "harmful"),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    from guardrail.guards.embedded.encoder import default_encoder_path, load_encoder
    from offline.embedding_cache import encoder_fingerprint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--cache-dir", default=".cache/embeddings")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", default="step")
    parser.add_argument("--l2", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--source-balance", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-requests", action="store_true")
    parser.add_argument("--skip-responses", action="store_true")
    parser.add_argument("--baseline-only", action="store_true",
                        help="measure today's heads and stop")
    parser.add_argument("--baseline-head", default=None,
                        help="a folder with the heads to measure as today's (default: shipped)")
    tuning = parser.add_argument_group(
        "fine-tuning", "--finetune-layers N > 0: each fold fine-tunes the encoder's top N layers "
        "with the response head (offline/embedded_finetune.py) instead of fitting a linear head "
        "on cached embeddings; the request head is the frozen one either way")
    tuning.add_argument("--finetune-layers", type=int, default=0)
    tuning.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    tuning.add_argument("--epochs", type=float, default=FineTuneSettings.epochs)
    tuning.add_argument("--batch-size", type=int, default=FineTuneSettings.batch_size)
    tuning.add_argument("--encoder-learning-rate", type=float,
                        default=FineTuneSettings.encoder_learning_rate)
    tuning.add_argument("--head-learning-rate", type=float,
                        default=FineTuneSettings.head_learning_rate)
    tuning.add_argument("--threshold-rule", choices=["out-of-source", "validation"],
                        default="out-of-source",
                        help="out-of-source: one extra fit per training source in every fold")
    tuning.add_argument("--encoder", default=None,
                        help="encoder folder (default: the packaged all-MiniLM-L6-v2)")
    tuning.add_argument("--records", default=None,
                        help="packed response rows (offline.embedded_finetune_pack) in place of "
                        "--data-dir; requests and the baseline are then skipped")
    tuning.add_argument("--checkpoint-dir", default=None,
                        help="training checkpoints and finished folds; a rerun resumes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.finetune_layers:
        return finetuned_loso(args)
    data = Path(args.data_dir)
    encoder = load_encoder()
    cache = EmbeddingCache(Path(args.cache_dir), encoder,
                           encoder_fingerprint(default_encoder_path()))
    responses = load_responses(data, args.seed)
    requests = load_requests(data, args.seed)
    settings = FitSettings(l2=args.l2, steps=args.steps, source_balance=args.source_balance,
                           seed=args.seed)
    recipe = HeadRecipe(blocks=tuple(b for b in args.blocks.split(",") if b), fit=settings,
                        threshold_out_of_source=args.threshold_rule == "out-of-source")
    out: dict[str, Any] = {"recipe": {"blocks": list(recipe.blocks), "l2": args.l2,
                                      "steps": args.steps,
                                      "source_balance": args.source_balance,
                                      "seed": args.seed}}
    if not args.skip_baseline:
        out["today"] = shipped_baseline(
            [] if args.skip_responses else responses, [] if args.skip_requests else requests,
            cache, Path(args.baseline_head) if args.baseline_head else None)
        if not args.skip_responses:
            print(response_table(out["today"]["responses"], "today: source"))
            print()
        if not args.skip_requests:
            print(request_table(out["today"]["requests"], "today: request source"))
            print()
    if args.baseline_only:
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
        return out
    out["responses"] = {}
    if not args.skip_responses:
        response_data = embed_responses(responses, cache)
        out["responses"] = loso_responses(response_data, recipe, say)
        print(response_table(out["responses"], "held-out source"))
        print()
    if not args.skip_requests:
        vectors = embed_requests(requests, cache)
        out["requests"] = loso_requests(requests, vectors, settings, say)
        print(request_table(out["requests"], "held-out request source"))
        print()
    out["summary"] = summary(out["responses"], out.get("requests", {}))
    print(json.dumps(out["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def finetuned_loso(args: argparse.Namespace) -> dict[str, Any]:
    """The response table with a fine-tuned encoder in every fold."""
    import os

    import torch

    from guardrail.guards.embedded.encoder import load_encoder
    from offline.embedded_data import read_records
    from offline.embedded_features import response_windows
    from offline.embedded_finetune import FineTuneRecipe

    if args.device.startswith("cuda"):
        # Deterministic cuBLAS (set before CUDA starts); kernels without a deterministic
        # version warn rather than stop the run.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU visible to torch")
    responses = (read_records(Path(args.records)) if args.records
                 else load_responses(Path(args.data_dir), args.seed))
    settings = FineTuneSettings(
        layers=args.finetune_layers, epochs=args.epochs, batch_size=args.batch_size,
        encoder_learning_rate=args.encoder_learning_rate,
        head_learning_rate=args.head_learning_rate, seed=args.seed, device=args.device)
    encoder = Path(args.encoder) if args.encoder else None
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    recipe = FineTuneRecipe(settings=settings, encoder=encoder, threshold_rule=args.threshold_rule,
                            checkpoint_dir=checkpoints)
    windows = response_windows(responses, load_encoder(encoder).windows)
    described = {"finetune": settings.fingerprint_fields(), "threshold_rule": args.threshold_rule,
                 "responses": len(responses), "windows": len(windows.texts)}
    say(f"{len(responses)} responses, {len(windows.texts)} windows; {described}")
    store = fold_store(checkpoints, described, responses) if checkpoints is not None else None
    started = time.perf_counter()
    out: dict[str, Any] = {"recipe": described}
    out["responses"] = loso_responses(windows, recipe, say, store)
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(response_table(out["responses"], "held-out source"))
    print()
    out["summary"] = {key: value for key, value in summary(out["responses"], {}).items()
                      if "requests" not in key}  # the request head is the frozen one
    print(json.dumps(out["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
