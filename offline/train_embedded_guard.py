"""Train the embedded guard's heads and write a folder that ``guard.model`` can point at.

Two linear heads on the frozen all-MiniLM-L6-v2 encoder (or ``--encoder DIR``); with
``--finetune-layers N`` the encoder's top N layers are fine-tuned with the response head
(``offline/embedded_finetune.py``, ``--device cuda`` on a GPU) and shipped beside it as
``encoder_layers.safetensors``, the request and category heads staying on the frozen encoder:

- the response head (``head.json``): judges a step (or a whole response) over overlapping
  128-token windows with the user's request; the worst window decides. Trained on every
  trainable response source of the shared data (``offline/embedded_data.py``: jailbroken and
  harmful responses, refusals, benign answers) plus the team's own files;
- the request head (``request_head.json``): does the request ask for harmful help?

Every class carries half the loss and, within a class, every source the same share. The
threshold is chosen on a validation part (by group: a question and its answers stay together)
of the training sources: the best F1 among thresholds that flag at most ``max_refusal_fpr`` of
the refusals and ``max_benign_fpr`` of the benign answers (``max_everyday_fpr`` of the everyday
requests for the request head). The folder gets ``DATASHEET.md`` with the figures measured here
(validation per source, the evaluation-only sets, and with ``--loso`` the leave-one-source-out
table of ``offline/embedded_loso.py``).

A team's own labelled files (``--extra FILE``, repeatable; JSON lines or CSV with ``prompt``,
``response``, ``label`` and optional ``categories``) are added to the training data: rows with a
response train the response head, rows without one the request head. ``--no-shared-data``
trains on them alone.

    python -m offline.train_embedded_guard --output-dir my-guard --extra reviewed.jsonl
    python -m offline.train_embedded_guard --config train.yaml --steps 500

Options come from the dataclass below: a YAML file (``--config``) first, then the command line.
Deterministic for a given seed, data and thread count. Embeddings are cached in ``cache_dir``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from offline.embedded_data import (
    SOURCE_BY_NAME,
    Labelled,
    load_extra,
    load_requests,
    load_responses,
)
from offline.embedded_features import embed_requests, embed_responses
from offline.embedded_model import FitSettings, held_out, report
from offline.embedding_cache import Vectors

DEFAULT_OUTPUT = "guardrail/guards/embedded/weights"


@dataclass
class TrainEmbeddedGuardConfig:
    data_dir: str = "../shared/data"
    """A folder laid out like the project's shared data (one sub-folder per source)."""
    shared_data: bool = True
    """Train on the shared data (False: on the ``extra`` files alone)."""
    extra: list[str] = field(default_factory=list)
    """A team's own labelled files (JSON lines or CSV): prompt, response, label, categories."""
    output_dir: str = DEFAULT_OUTPUT
    cache_dir: str = ".cache/embeddings"
    encoder: str | None = None
    """Encoder folder; None is the packaged all-MiniLM-L6-v2. Copied to OUTPUT/encoder."""
    seed: int = 0
    blocks: str = "step"
    """Feature blocks per window: step (the window), request, step*request. The step alone
    held up best on sources left out of training (the request's style is a source's own)."""
    window_tokens: int = 128
    window_stride: int = 96
    request_tokens: int = 128
    l2: float = 1e-2
    steps: int = 300
    learning_rate: float = 0.05
    source_balance: float = 1.0
    val_fraction: float = 0.2
    max_refusal_fpr: float = 0.02
    max_benign_fpr: float = 0.02
    max_everyday_fpr: float = 0.01
    max_lookalike_fpr: float = 0.10
    request_head: bool = True
    threshold_rule: str = "out-of-source"
    """out-of-source: the threshold is chosen on each training source scored by a head trained
    without it (one extra fit per source); validation: on held-out groups of the sources."""
    loso: bool = False
    """Also run the leave-one-source-out evaluation and put its table in the datasheet."""
    finetune_layers: int = 0
    """Fine-tune the encoder's top N transformer layers with the response head (6: all of
    MiniLM's; 0: the frozen encoder and a linear head). Writes encoder_layers.safetensors."""
    device: str = "cpu"
    """Where fine-tuning runs: cpu or cuda (bf16 autocast on cuda)."""
    epochs: float = 3.0
    batch_size: int = 32
    encoder_learning_rate: float = 2e-5
    head_learning_rate: float = 1e-3
    checkpoint_dir: str = ".cache/finetune"
    """Fine-tuning checkpoints (a rerun with the same data and settings resumes)."""
    threads: int = 2
    notes: str | None = None
    """A Markdown file appended to the generated DATASHEET.md (what it catches and misses)."""


def _config_defaults(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise SystemExit(f"{path}: a YAML mapping of options expected")
    known = {spec.name for spec in fields(TrainEmbeddedGuardConfig)}
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown options {unknown}")
    return loaded


def parse_args(argv: Sequence[str] | None = None) -> TrainEmbeddedGuardConfig:
    """A YAML file (``--config``) first, then the command line, as TRL's scripts do."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = asdict(TrainEmbeddedGuardConfig()) | _config_defaults(known.config)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[pre])
    for spec in fields(TrainEmbeddedGuardConfig):
        flag = "--" + spec.name.replace("_", "-")
        default = defaults[spec.name]
        if spec.name == "extra":
            parser.add_argument(flag, action="append", default=None,
                                help="a labelled file (repeatable)")
        elif isinstance(asdict(TrainEmbeddedGuardConfig())[spec.name], bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif spec.name in ("encoder", "notes"):
            parser.add_argument(flag, default=default)
        else:
            kind = type(asdict(TrainEmbeddedGuardConfig())[spec.name])
            parser.add_argument(flag, type=kind, default=default)
    values = vars(parser.parse_args(argv))
    values.pop("config")
    values["extra"] = [*defaults["extra"], *(values["extra"] or [])]
    return TrainEmbeddedGuardConfig(**values)


# -- training -----------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def gather(config: TrainEmbeddedGuardConfig) -> tuple[list[Labelled], list[Labelled]]:
    responses: list[Labelled] = []
    requests: list[Labelled] = []
    if config.shared_data:
        data = Path(config.data_dir)
        if not data.is_dir():
            raise SystemExit(f"{data}: no data folder (see --data-dir, or --no-shared-data)")
        responses = load_responses(data, config.seed)
        requests = load_requests(data, config.seed) if config.request_head else []
    for file in config.extra:
        path = Path(file)
        if not path.is_file():
            raise SystemExit(f"{path}: no such labelled file")
        try:
            rows = load_extra(path)
        except ValueError as error:
            raise SystemExit(str(error)) from None
        responses += [row for row in rows if row.kind == "response"]
        requests += [row for row in rows if row.kind == "request"]
    if not any(r.label for r in responses) or all(r.label for r in responses):
        raise SystemExit("the response head needs harmful and harmless responses to learn from")
    return responses, requests


def main(config: TrainEmbeddedGuardConfig) -> dict[str, Any]:
    import torch

    from guardrail.guards.embedded.encoder import (
        DEFAULT_ENCODER_NAME,
        default_encoder_path,
        load_encoder,
    )
    from guardrail.guards.embedded.guard import REQUEST_HEAD_FILE
    from guardrail.guards.embedded.head import LinearHead
    from guardrail.guards.embedded.layers import LAYERS_FILE
    from offline.embedded_loso import (
        HeadRecipe,
        fit_request_head,
        fold_store,
        loso_responses,
        response_table,
    )
    from offline.embedding_cache import EmbeddingCache, encoder_fingerprint

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    responses, requests = gather(config)
    _say(f"{len(responses)} responses, {len(requests)} requests")
    folder = Path(config.encoder) if config.encoder else default_encoder_path()
    encoder = load_encoder(folder, max_length=max(256, config.window_tokens))
    cache = EmbeddingCache(Path(config.cache_dir), encoder, encoder_fingerprint(folder))
    settings = FitSettings(l2=config.l2, steps=config.steps, learning_rate=config.learning_rate,
                           source_balance=config.source_balance, seed=config.seed)
    blocks = tuple(block.strip() for block in config.blocks.split(",") if block.strip())
    if config.finetune_layers and blocks != ("step",):
        raise SystemExit("--finetune-layers trains a head on the step alone (--blocks step)")
    recipe: Any = HeadRecipe(blocks=blocks, fit=settings, val_fraction=config.val_fraction,
                             max_fpr={"refusal": config.max_refusal_fpr,
                                      "benign-answer": config.max_benign_fpr},
                             threshold_out_of_source=config.threshold_rule == "out-of-source")
    name = DEFAULT_ENCODER_NAME if config.encoder is None else folder.name
    output = Path(config.output_dir)
    metadata = {"trained_with": command_line(config),
                "sources": dict(sorted(Counter(r.source for r in responses).items()))}
    trainable = [i for i, r in enumerate(responses) if not r.eval_only]
    evaluation = [i for i, r in enumerate(responses) if r.eval_only]
    rows: Any
    if config.finetune_layers:
        rows, recipe = _finetune_recipe(config, responses, encoder)
        _say(f"fine-tuning the top {config.finetune_layers} encoder layers with the response "
             f"head on {config.device}")
    else:
        rows = embed_responses(responses, cache, window_tokens=config.window_tokens,
                               window_stride=config.window_stride,
                               request_tokens=config.request_tokens)
        _say("fitting the response head")
    fitted: Any = recipe.train(rows.subset(trainable))
    figures: dict[str, Any] = {"threshold": round(fitted.threshold, 4)}
    if fitted.out_of_source is not None:  # each source scored by a head trained without it
        oos = fitted.out_of_source
        figures["validation"] = _per_source(rows.subset(trainable), lambda _: oos,
                                            fitted.threshold)
    else:
        val = [i for i in trainable if held_out(responses[i].group, config.seed,
                                                 config.val_fraction)]
        figures["validation"] = _per_source(rows.subset(val), fitted.scores, fitted.threshold)
    if evaluation:
        figures["evaluation_only"] = _per_source(rows.subset(evaluation), fitted.scores,
                                                 fitted.threshold)
    if config.loso:
        store = (fold_store(Path(config.checkpoint_dir), asdict(recipe.settings) | {
            "rule": config.threshold_rule}, responses) if config.finetune_layers else None)
        figures["loso"] = loso_responses(rows, recipe, _say, store)
    if config.finetune_layers:
        written = fitted.tuner.save(output, fitted.threshold, config.window_stride, name,
                                    metadata | {"figures": figures})
    else:
        written = [LinearHead(
            blocks=blocks, dim=encoder.dim, weights=fitted.weights, bias=fitted.bias,
            threshold=round(fitted.threshold, 4), encoder=name,
            request_max_tokens=config.request_tokens,
            step_max_tokens=max(256, config.window_tokens),
            window_tokens=config.window_tokens, window_stride=config.window_stride,
            metadata=metadata | {"figures": figures},
        ).save(output)]
        (output / LAYERS_FILE).unlink(missing_ok=True)  # a fine-tuned run's, no longer used
    if config.request_head and requests and any(r.label for r in requests) \
            and not all(r.label for r in requests):
        _say("fitting the request head")
        vectors = embed_requests(requests, cache, config.request_tokens)
        trainable_requests = [i for i, r in enumerate(requests) if not r.eval_only]
        request_head = fit_request_head([requests[i] for i in trainable_requests],
                                        vectors[trainable_requests], settings,
                                        config.val_fraction,
                                        {"everyday": config.max_everyday_fpr,
                                         "lookalike": config.max_lookalike_fpr})
        request_val = [i for i in range(len(requests))
                       if requests[i].eval_only
                       or held_out(requests[i].group, config.seed, config.val_fraction)]
        figures["requests_validation"] = {
            source: report([requests[i] for i in request_val if requests[i].source == source],
                           request_head.scores(vectors[[i for i in request_val
                                                        if requests[i].source == source]]),
                           request_head.threshold)
            for source in sorted({requests[i].source for i in request_val})}
        written.append(LinearHead(
            blocks=("request",), dim=encoder.dim, weights=request_head.weights,
            bias=request_head.bias, threshold=round(request_head.threshold, 4), encoder=name,
            request_max_tokens=config.request_tokens,
            metadata={"trained_with": command_line(config),
                      "sources": dict(sorted(Counter(r.source for r in requests).items()))},
        ).save(output, REQUEST_HEAD_FILE))
    prompts = cache.encode([r.prompt for r in responses], config.request_tokens, "left",
                           desc="prompts")
    coded = fit_category_head(config, responses, requests, prompts, cache, settings)
    if coded is not None:
        head_file, figures["categories"] = coded[0].save(output), coded[1]
        written.append(head_file)
    if config.encoder is not None and (output / "encoder").resolve() != folder.resolve():
        shutil.copytree(folder, output / "encoder", dirs_exist_ok=True)
    seconds = time.perf_counter() - started
    figures["seconds"] = round(seconds, 1)
    sheet = datasheet(config, responses, requests, figures, response_table)
    if config.notes:
        sheet += "\n" + Path(config.notes).read_text(encoding="utf-8")
    (output / "DATASHEET.md").write_text(sheet, encoding="utf-8")
    _say(f"wrote {', '.join(str(path) for path in written)} and {output / 'DATASHEET.md'} "
         f"in {seconds:.0f}s ({cache.encoded} texts newly encoded)")
    return figures


def _finetune_recipe(config: TrainEmbeddedGuardConfig, responses: Sequence[Labelled],
                     encoder: Any) -> tuple[Any, Any]:
    """(the responses' windows, the fine-tuning recipe) for ``--finetune-layers``."""
    import os

    import torch

    from offline.embedded_features import response_windows
    from offline.embedded_finetune import FineTuneRecipe, FineTuneSettings

    if config.threshold_rule not in ("out-of-source", "validation"):
        raise SystemExit(f"--threshold-rule {config.threshold_rule}: out-of-source or validation")
    if config.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU visible to torch")
    settings = FineTuneSettings(
        layers=config.finetune_layers, epochs=config.epochs, batch_size=config.batch_size,
        encoder_learning_rate=config.encoder_learning_rate,
        head_learning_rate=config.head_learning_rate, window_tokens=config.window_tokens,
        seed=config.seed, device=config.device)
    recipe = FineTuneRecipe(
        settings=settings, encoder=Path(config.encoder) if config.encoder else None,
        max_fpr={"refusal": config.max_refusal_fpr, "benign-answer": config.max_benign_fpr},
        threshold_rule="validation" if config.threshold_rule == "validation" else "out-of-source",
        val_fraction=config.val_fraction, checkpoint_dir=Path(config.checkpoint_dir))
    rows = response_windows(responses, encoder.windows, window_tokens=config.window_tokens,
                            window_stride=config.window_stride)
    return rows, recipe


def fit_category_head(config: TrainEmbeddedGuardConfig, responses: Sequence[Labelled],
                      requests: Sequence[Labelled], prompts: Vectors, cache: Any,
                      settings: FitSettings) -> tuple[Any, dict[str, Any]] | None:
    """The hazard-code head, on the request embeddings of every harmful row that carries codes
    (fitted on the training groups, measured on the validation ones); None without such rows."""
    from guardrail.guards.embedded.head import CategoryHead
    from offline.embedded_model import category_report, fit_categories

    rows: list[tuple[Labelled, Any]] = []
    seen: set[str] = set()
    for index, record in enumerate(responses):
        if record.categories and not record.eval_only and record.prompt not in seen:
            seen.add(record.prompt)
            rows.append((record, prompts[index]))
    coded_requests = [r for r in requests if r.categories and not r.eval_only
                      and r.prompt not in seen]
    if coded_requests:
        vectors = embed_requests(coded_requests, cache, config.request_tokens)
        rows += list(zip(coded_requests, vectors, strict=True))
    if len(rows) < 20:
        return None
    val = np.array([held_out(r.group, config.seed, config.val_fraction) for r, _ in rows])
    if val.all() or not val.any():
        val = np.zeros(len(rows), dtype=bool)
    matrix = np.stack([vector for _, vector in rows])
    truth = [record.categories for record, _ in rows]
    codes, weights, biases = fit_categories(
        matrix[~val], [t for t, v in zip(truth, val, strict=True) if not v], settings)
    if not codes:
        return None
    head = CategoryHead(codes=tuple(codes), weights=weights, bias=biases,
                        metadata={"trained_with": command_line(config)})
    checked = val if val.any() else ~val
    figures = category_report([t for t, v in zip(truth, checked, strict=True) if v],
                              head.name(matrix[checked]), codes)
    return head, figures


def _per_source(data: Any, scores: Any, threshold: float) -> dict[str, Any]:
    values = scores(data)
    out: dict[str, Any] = {}
    for source in sorted({r.source for r in data.records}):
        chosen = [i for i, r in enumerate(data.records) if r.source == source]
        out[source] = report([data.records[i] for i in chosen], values[chosen], threshold)
    return out


def command_line(config: TrainEmbeddedGuardConfig) -> str:
    """The command that reproduces ``config`` (options at their defaults left out)."""
    defaults = asdict(TrainEmbeddedGuardConfig())
    options = []
    for key, value in asdict(config).items():
        if value == defaults[key] or key in ("cache_dir", "threads"):
            continue
        if key == "extra":
            options += [f"--extra={item}" for item in value]
        elif isinstance(value, bool):
            options.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        else:
            options.append(f"--{key.replace('_', '-')}={value}")
    return " ".join(["python -m offline.train_embedded_guard", *options])


def datasheet(config: TrainEmbeddedGuardConfig, responses: Sequence[Labelled],
              requests: Sequence[Labelled], figures: dict[str, Any],
              table: Any) -> str:
    counts = Counter((r.source, r.label) for r in [*responses, *requests])
    tuned = "frozen" if not config.finetune_layers else (
        f"its top {config.finetune_layers} layers fine-tuned with the response head "
        f"({config.epochs:g} epochs of source- and class-balanced batches of "
        f"{config.batch_size}; encoder_layers.safetensors), the request and category heads on "
        "the frozen encoder")
    rule = ("out-of-source scores (each training source scored by a head trained without it"
            if config.threshold_rule == "out-of-source"
            else "held-out groups of the training sources (a validation part")
    lines = [
        "# Embedded guard heads: datasheet (generated by offline/train_embedded_guard.py)",
        "",
        f"Trained with `{command_line(config)}` in {figures['seconds']:.0f} s. Encoder: "
        f"{config.encoder or 'all-MiniLM-L6-v2 (packaged)'}, {tuned}. Response head: linear on "
        f"`{config.blocks}` per {config.window_tokens}-token window (stride "
        f"{config.window_stride}), the worst window decides; threshold "
        f"**{figures['threshold']}**, chosen on {rule}; the best F1 with at most "
        f"{100 * config.max_refusal_fpr:g} % of refusals and {100 * config.max_benign_fpr:g} % "
        f"of benign answers flagged).",
        "",
        "## Data",
        "",
        "| source | licence | kind | harmful | harmless | use | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for source in sorted({r.source for r in [*responses, *requests]}):
        spec = SOURCE_BY_NAME.get(source)
        kind = next(r.kind for r in [*responses, *requests] if r.source == source)
        licence = spec.licence if spec else "the team's own"
        meaning = spec.meaning if spec else "the team's labelled file"
        use = "test only" if spec and spec.eval_only else "train / validation"
        lines.append(f"| {source} | {licence} | {kind} | {counts[(source, 1)]} | "
                     f"{counts[(source, 0)]} | {use} | {meaning} |")
    title = ("## Out of source (each source scored by a head trained without it; the "
             "threshold was chosen on these scores, so they flatter it a little)"
             if config.threshold_rule == "out-of-source" else
             "## Validation part (held-out groups; the threshold was chosen on them)")
    lines += ["", title, "",
              table(figures["validation"], "source"), ""]
    if "evaluation_only" in figures:
        lines += ["## Evaluation-only sets (never trained on)", "",
                  table(figures["evaluation_only"], "source"), ""]
    if "loso" in figures:
        lines += ["## Leave one source out (trained without the source, threshold chosen "
                  "without it)", "", table(figures["loso"], "held-out source"), ""]
    if "categories" in figures:
        lines += ["## Hazard categories (validation rows with codes)", "",
                  "| code | precision | recall | rows |", "|---|---|---|---|"]
        lines += [f"| {code} | {row['precision']} | {row['recall']} | {row['n']} |"
                  for code, row in figures["categories"].items() if code != "any right"]
        anyright = figures["categories"]["any right"]
        lines += ["", f"At least one right code: {100 * anyright['rate']:.1f} % of "
                  f"{anyright['n']} rows.", ""]
    if "requests_validation" in figures:
        from offline.embedded_loso import request_table

        lines += ["## Request head, validation and evaluation-only sets", "",
                  request_table(figures["requests_validation"], "request source"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    result = main(parse_args())
    print(json.dumps({key: value for key, value in result.items() if key != "loso"}, indent=1,
                     default=str)[:4000])
