"""``guardrail harvest``: a store of intercepted cases -> UnsafeChain records, IPO preference
pairs and a dataset card.

    guardrail harvest --out DIR [--config PROXY.yaml] [--store URL] [--since 2026-11-01]
                      [--categories S9,S1] [--min-score 0.8] [--labels confirmed,none]
                      [--dry-run] [...]
    guardrail harvest import NAME [--path FILE] --out FILE.jsonl

The config is the proxy's own file: its store is the default ``--store`` and its guard
re-judges every corrected response. Cases are read through the store protocol with a cursor
(memory stays flat in the number of cases), turned into training material
(:mod:`offline.case_material`), and passed through a funnel of filters, each of which counts
what it removed: the review labels, complete answers only, refusal-only corrections (kept unless
``--drop-refusals``), the re-judgement, near-duplicate prompts, decontamination against every
evaluation suite, optional personal-data scrubbing, a seeded train/test split and an optional
mix-in of benign cases that passed untouched. ``--dry-run`` prints the funnel and writes
nothing. The output is written into a temporary folder renamed at the end, so a folder named
``DIR`` is always complete.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import random
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardrail.cases import build_store
from guardrail.cases.base import CaseQuery
from guardrail.cases.model import Action, Case
from guardrail.config import Config, StoreConfig, load_config
from guardrail.errors import GuardrailError
from offline.case_material import CORRECTED, CaseMaterial, material_of
from offline.harvest.funnel import FilterResult
from offline.harvest.pairs import PreferencePair, build_pair
from offline.harvest.records import RecordError, UnsafeChainRecord, format_response

logger = logging.getLogger(__name__)

UNUSABLE_LABELS = ("false_positive", "bad_correction")
CARD_LICENCE = "other"


@dataclass
class HarvestConfig:
    """Every option of ``guardrail harvest``; the command line sets them."""

    out: Path | None = None
    config: str | None = None
    store: str | None = None
    since: float | None = None
    until: float | None = None
    categories: tuple[str, ...] = ()
    min_score: float | None = None
    labels: tuple[str | None, ...] = ()
    """Review labels to keep (``none`` = unreviewed); default: all but false_positive and
    bad_correction."""
    dry_run: bool = False
    drop_refusals: bool = False
    rejudge: bool = True
    dedupe_threshold: float = 0.85
    decontaminate: bool = True
    suites: tuple[str, ...] = ()
    data_dir: Path | None = None
    embedding_decontamination: bool = False
    scrub: bool = False
    test_fraction: float = 0.1
    benign_ratio: float = 0.0
    seed: int = 42
    template: str = "deepseek-r1-distill"
    batch_size: int = 500
    overwrite: bool = False
    save_to_disk: bool = False
    push_to_hub: str | None = None
    licence: str = CARD_LICENCE


@dataclass
class Funnel:
    """The harvest's stages in order, each with what it kept and removed."""

    stages: list[dict[str, Any]] = field(default_factory=list)

    def add(self, result: FilterResult[Any]) -> None:
        self.stages.append(result.summary())

    def note(self, name: str, kept: int, removed: Counter[str], **details: Any) -> None:
        self.stages.append({"filter": name, "kept": kept, "removed": sum(removed.values()),
                            "by_reason": dict(sorted(removed.items())), **details})

    def line(self) -> str:
        return " -> ".join(f"{stage['kept']:,} {stage['filter']}" for stage in self.stages)


class HarvestError(GuardrailError):
    """A harvest that cannot run: the message is one line saying why."""


# -- reading cases --------------------------------------------------------------------------------


@dataclass
class Gathered:
    total: int = 0
    unreadable: int = 0
    intercepted: list[CaseMaterial] = field(default_factory=list)
    benign: list[UnsafeChainRecord] = field(default_factory=list)
    """A seeded reservoir of benign passed cases (only when a mix-in is asked for)."""
    benign_seen: int = 0


BENIGN_RESERVOIR = 50_000


async def gather(store_url: str, options: HarvestConfig) -> Gathered:
    """One pass over the store, oldest first: corrected cases become material; benign passed
    cases are sampled into a bounded reservoir."""
    store = build_store(StoreConfig(url=store_url))
    try:
        await store.open()
    except GuardrailError as error:
        raise HarvestError(f"store {store_url}: {error}") from None
    gathered = Gathered()
    rng = random.Random(options.seed)
    actions: tuple[Action, ...] = tuple(CORRECTED)
    if options.benign_ratio > 0:
        actions = (*actions, "pass")
    query = CaseQuery(since=options.since, until=options.until)
    try:
        scan = store.scan(query, batch_size=options.batch_size)
        async for case in scan:
            gathered.total += 1
            if case.action not in actions:
                continue
            if case.action == "pass":
                _sample_benign(case, gathered, rng)
                continue
            material = material_of(case)
            if material is not None:
                gathered.intercepted.append(material)
        gathered.unreadable = scan.skipped
    except GuardrailError as error:
        raise HarvestError(f"store {store_url}: {error}") from None
    finally:
        await store.aclose()
    return gathered


def _sample_benign(case: Case, gathered: Gathered, rng: random.Random) -> None:
    if case.guard in (None, "none") or case.status != "complete" or case.finish_reason != "stop":
        return
    prompt = _user_text(case)
    if not prompt.strip() or not case.client_content.strip():
        return
    record = UnsafeChainRecord.build(prompt, case.client_reasoning, case.client_content,
                                     guard=case.guard, correction="none", case_id=case.id,
                                     label=case.review.label if case.review else None)
    gathered.benign_seen += 1
    if len(gathered.benign) < BENIGN_RESERVOIR:
        gathered.benign.append(record)
    else:  # reservoir sampling keeps a uniform sample in bounded memory
        slot = rng.randrange(gathered.benign_seen)
        if slot < BENIGN_RESERVOIR:
            gathered.benign[slot] = record


def _user_text(case: Case) -> str:
    from guardrail.views import request_text

    return request_text(case.request.get("messages") or [], max_chars=1_000_000)


# -- the funnel -----------------------------------------------------------------------------------


def keep_where(name: str, items: Sequence[CaseMaterial],
               reason_of: Callable[[CaseMaterial], str | None]) -> FilterResult[CaseMaterial]:
    """A filter from a rule that names why an item goes (None: it stays)."""
    result: FilterResult[CaseMaterial] = FilterResult(name, [])
    for item in items:
        reason = reason_of(item)
        if reason is None:
            result.kept.append(item)
        else:
            result.removed[reason] += 1
    return result


def selection_filters(options: HarvestConfig) -> list[tuple[str,
                                                            Callable[[CaseMaterial], str | None]]]:
    """The rules that need no model, in funnel order."""
    wanted_labels = set(options.labels)
    categories = set(options.categories)

    def labelled(item: CaseMaterial) -> str | None:
        if wanted_labels:
            return None if item.label in wanted_labels else f"label {item.label or 'none'}"
        return f"label {item.label}" if item.label in UNUSABLE_LABELS else None

    def category(item: CaseMaterial) -> str | None:
        if categories and not categories.intersection(item.categories):
            return "category not asked for"
        if options.min_score is not None and (item.score is None
                                              or item.score < options.min_score):
            return "score under --min-score"
        return None

    def complete(item: CaseMaterial) -> str | None:
        if item.finish_reason != "stop":
            return f"cut short (finish_reason {item.finish_reason})"
        if not item.safe_answer.strip():
            return "no answer"
        return None

    def refusal(item: CaseMaterial) -> str | None:
        return "refusal only" if options.drop_refusals and item.refusal_only else None

    return [("selected", category), ("review labels", labelled), ("complete", complete),
            ("refusals", refusal)]


async def rejudge(items: Sequence[CaseMaterial], config: Config) -> FilterResult[CaseMaterial]:
    """Each corrected response judged again, step by step as the proxy judges, by the
    configured guard; a response with any unsafe step (or one the guard could not judge)
    goes."""
    from guardrail.guards import build_guard
    from guardrail.guards.capabilities import warm_up
    from guardrail.step_checker import StepChecker
    from offline.check import judge_response

    result: FilterResult[CaseMaterial] = FilterResult(
        "re-judged", [], details={"guard": config.guard.kind})
    if config.guard.kind == "none":
        result.kept.extend(items)
        return result
    guard = build_guard(config.guard)
    try:
        await warm_up(guard)
        checker = StepChecker(guard, config.guard)
        for item in items:
            verdicts = await judge_response(checker, config, item.prompt, item.safe_reasoning,
                                            item.safe_answer)
            if any(verdict.error is not None for verdict in verdicts):
                result.removed["guard could not judge"] += 1
            elif any(verdict.unsafe for verdict in verdicts):
                result.removed["judged unsafe again"] += 1
            else:
                result.kept.append(item)
    finally:
        await guard.aclose()
    return result


def to_record(item: CaseMaterial) -> UnsafeChainRecord:
    unsafe = item.unsafe_continuation
    if item.flagged_channel == "answer":
        unsafe_response = format_response(item.prefix_reasoning, item.prefix_answer + unsafe)
    else:
        unsafe_response = f"<think>\n{(item.prefix_reasoning + unsafe).strip()}"
    return UnsafeChainRecord.build(
        item.prompt, item.safe_reasoning, item.safe_answer,
        unsafe_response=unsafe_response,
        category=",".join(item.categories) or None, score=item.score, guard=item.guard,
        correction=item.correction, case_id=item.case_id, label=item.label, source="proxy")


def to_pair(item: CaseMaterial, template: str) -> PreferencePair | str:
    """The IPO pair of an intervened case, or why it has none."""
    if item.correction != "intervene" or not item.trigger:
        return "not an intervention"
    if item.flagged_channel != "reasoning":
        return "cut in the answer (no shared reasoning prefix)"
    if not item.continuation_completed:
        return "continuation flagged again or failed"
    try:
        return build_pair(item.prompt, item.prefix_reasoning, item.trigger,
                          item.continuation_reasoning, item.continuation_answer,
                          item.unsafe_continuation, template=template, case_id=item.case_id,
                          category=",".join(item.categories) or None)
    except RecordError as error:
        return str(error)


@dataclass
class Harvest:
    funnel: Funnel
    train: list[UnsafeChainRecord]
    test: list[UnsafeChainRecord]
    pairs_train: list[PreferencePair]
    pairs_test: list[PreferencePair]
    counts: dict[str, Counter[str]]


async def harvest(options: HarvestConfig, config: Config, store_url: str) -> Harvest:
    from offline.harvest.dedupe import DedupeOptions, dedupe
    from offline.harvest.mixin import mix_in
    from offline.harvest.split import train_test_split

    funnel = Funnel()
    gathered = await gather(store_url, options)
    funnel.note("cases", gathered.total,
                Counter({"unreadable records": gathered.unreadable} if gathered.unreadable
                        else {}))
    items = gathered.intercepted
    funnel.note("intercepted", len(items), Counter(
        {"passed, blocked, errors or in progress": gathered.total - len(items)}))
    for name, rule in selection_filters(options):
        result = keep_where(name, items, rule)
        funnel.add(result)
        items = result.kept
    if options.rejudge:
        judged = await rejudge(items, config)
        funnel.add(judged)
        items = judged.kept
    deduped = dedupe(items, key=lambda item: item.prompt,
                     options=DedupeOptions(threshold=options.dedupe_threshold))
    funnel.add(deduped)
    items = deduped.kept
    if options.decontaminate:
        items = _decontaminate(items, options, funnel)
    records = [to_record(item) for item in items]
    pairs: list[PreferencePair] = []
    no_pair: Counter[str] = Counter()
    pair_of: dict[str, PreferencePair] = {}
    for item in items:
        pair = to_pair(item, options.template)
        if isinstance(pair, str):
            no_pair[pair] += 1
        else:
            pair_of[item.case_id] = pair
    if options.scrub:
        records, pair_of = _scrub(records, pair_of, options, funnel)
    split = train_test_split(records, key=lambda record: record.prompt,
                             test_fraction=options.test_fraction, seed=options.seed)
    funnel.note("split", len(split.train) + len(split.test), Counter(),
                train=len(split.train), test=len(split.test), seed=options.seed)
    train = split.train
    if options.benign_ratio > 0:
        mixed = mix_in(train, gathered.benign, options.benign_ratio, seed=options.seed)
        funnel.add(mixed)
        train = mixed.kept
    test_ids = {record.case_id for record in split.test}
    pairs = list(pair_of.values())
    pairs_train = [pair for pair in pairs if pair.case_id not in test_ids]
    pairs_test = [pair for pair in pairs if pair.case_id in test_ids]
    funnel.note("preference pairs", len(pairs), no_pair)
    counts: dict[str, Counter[str]] = {
        "category": Counter(record.category or "unspecified" for record in train + split.test),
        "correction": Counter(record.correction for record in train + split.test),
        "label": Counter(record.label or "none" for record in train + split.test),
        "source": Counter(record.source for record in train + split.test),
    }
    return Harvest(funnel, train, split.test, pairs_train, pairs_test, counts)


def _decontaminate(items: list[CaseMaterial], options: HarvestConfig,
                   funnel: Funnel) -> list[CaseMaterial]:
    from offline.harvest.decontaminate import decontaminate, load_default_encoder
    from offline.harvest.eval_sets import load_eval_sets

    try:
        eval_sets = load_eval_sets(options.suites or None, options.data_dir)
    except GuardrailError as error:
        raise HarvestError(f"decontamination: {error} (--data-dir DIR reads local copies; "
                           f"--no-decontaminate skips it)") from None
    encoder = load_default_encoder() if options.embedding_decontamination else None
    result = decontaminate(items, key=lambda item: item.prompt, eval_sets=eval_sets,
                           encoder=encoder)
    funnel.add(result)
    return result.kept


def _scrub(records: list[UnsafeChainRecord], pair_of: dict[str, PreferencePair],
           options: HarvestConfig, funnel: Funnel
           ) -> tuple[list[UnsafeChainRecord], dict[str, PreferencePair]]:
    from offline.harvest.scrub import scrub_pairs, scrub_records

    scrubbed = scrub_records(records)
    funnel.add(scrubbed)
    ids = list(pair_of)
    pairs = scrub_pairs([pair_of[case_id] for case_id in ids], options.template).kept
    return scrubbed.kept, dict(zip(ids, pairs, strict=True))


# -- writing ---------------------------------------------------------------------------------------


FILES = {
    "unsafechain": ("unsafechain.jsonl", "unsafechain.test.jsonl"),
    "preference_pairs": ("preference_pairs.jsonl", "preference_pairs.test.jsonl"),
}


def write(result: Harvest, options: HarvestConfig, out: Path) -> None:
    """Everything into a temporary folder beside ``out``, renamed to ``out`` at the end."""
    from offline.harvest.records import write_jsonl

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        parts = {
            FILES["unsafechain"][0]: [record.to_dict() for record in result.train],
            FILES["unsafechain"][1]: [record.to_dict() for record in result.test],
            FILES["preference_pairs"][0]: [pair.to_dict() for pair in result.pairs_train],
            FILES["preference_pairs"][1]: [pair.to_dict() for pair in result.pairs_test],
        }
        for name, rows in parts.items():
            write_jsonl(staging / name, rows)
        (staging / "funnel.json").write_text(json.dumps(result.funnel.stages, indent=2) + "\n",
                                             encoding="utf-8")
        card = dataset_card(result, options)
        card.save(str(staging / "README.md"))
        if options.save_to_disk:
            _save_to_disk(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _save_to_disk(folder: Path) -> None:
    import datasets

    for config_name, (train, test) in FILES.items():
        data_files = {"train": str(folder / train), "test": str(folder / test)}
        dataset = datasets.load_dataset("json", data_files=data_files)
        dataset.save_to_disk(str(folder / "datasets" / config_name))


def dataset_card(result: Harvest, options: HarvestConfig) -> Any:
    """A huggingface_hub DatasetCard: what is in the set, every filter and what it removed."""
    from huggingface_hub import DatasetCard, DatasetCardData

    size = len(result.train) + len(result.test)
    data = DatasetCardData(
        license=options.licence,
        language=["en"],
        pretty_name="Guardrail harvest: corrected reasoning traces",
        tags=["safety", "reasoning", "unsafechain", "ipo", "guardrail-harvest"],
        task_categories=["text-generation"],
        size_categories=[_size_category(size)],
        configs=[
            {"config_name": name, "data_files": [{"split": "train", "path": train},
                                                 {"split": "test", "path": test}]}
            for name, (train, test) in FILES.items()
        ],
    )
    lines = [
        "# Guardrail harvest",
        "",
        "> **Content warning.** `unsafe_response` and `rejected` hold what a model wrote before "
        "a guard stopped it: text that may describe harmful acts. Keep it out of anything "
        "users see.",
        "",
        "Written by `guardrail harvest` from the cases a reasoning-guardrail proxy intercepted: "
        "each record is a prompt on which the model went unsafe, with the corrected response the "
        "user read (`response`, `<think>` reasoning then answer) and what the model wrote before "
        "it was stopped (`unsafe_response`). `preference_pairs` are IPO pairs: a shared safe "
        "prefix inside `prompt`, `chosen` = the safety trigger and the safe continuation, "
        "`rejected` = the original continuation.",
        "",
        f"- UnsafeChain records: {len(result.train):,} train, {len(result.test):,} test",
        f"- preference pairs: {len(result.pairs_train):,} train, "
        f"{len(result.pairs_test):,} test",
        f"- licence: `{options.licence}` (the cases are this deployment's own traffic; the "
        "model's provider's output terms may apply)",
        "",
        "## Funnel",
        "",
        "| stage | kept | removed | by reason |",
        "|---|---|---|---|",
    ]
    for stage in result.funnel.stages:
        reasons = ", ".join(f"{reason}: {count:,}" for reason, count in
                            stage.get("by_reason", {}).items()) or "-"
        lines.append(f"| {stage['filter']} | {stage['kept']:,} | {stage['removed']:,} | "
                     f"{reasons} |")
    for name, counter in result.counts.items():
        lines += ["", f"## By {name}", "", f"| {name} | records |", "|---|---|"]
        lines += [f"| {key} | {count:,} |" for key, count in counter.most_common()]
    lines += ["", "## Options", "", "```json",
              json.dumps(_options_for_card(options), indent=2), "```", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return DatasetCard(content)


def _options_for_card(options: HarvestConfig) -> dict[str, Any]:
    chosen = {key: value for key, value in vars(options).items()
              if key not in ("out", "config", "store", "push_to_hub")}
    plain: dict[str, Any] = json.loads(json.dumps(chosen, default=str))
    return plain


def _size_category(size: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M")):
        if size < limit:
            return name
    return "1M<n<10M"


# -- the command -----------------------------------------------------------------------------------


def add_harvest_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "harvest", help="turn intercepted cases into UnsafeChain records and IPO pairs",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--config", help="the proxy's YAML config (its store and guard)")
    parser.add_argument("--store", help="case store URL (default: the config's store.url)")
    parser.add_argument("--since", type=_when, help="cases created at or after (ISO date)")
    parser.add_argument("--until", type=_when, help="cases created before (ISO date)")
    parser.add_argument("--categories", type=_names, default=(),
                        help="keep cases flagged with one of these categories (S9,S1)")
    parser.add_argument("--min-score", type=float, help="keep flags scored at least this")
    parser.add_argument("--labels", type=_labels, default=(),
                        help="review labels to keep (confirmed,none; default: all but "
                             "false_positive and bad_correction)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the funnel, write nothing")
    parser.add_argument("--drop-refusals", action="store_true",
                        help="drop cases whose correction only refused")
    parser.add_argument("--no-rejudge", dest="rejudge", action="store_false",
                        help="do not re-judge corrected responses with the config's guard")
    parser.add_argument("--dedupe-threshold", type=float, default=0.85,
                        help="MinHash Jaccard similarity at which prompts are duplicates")
    parser.add_argument("--no-decontaminate", dest="decontaminate", action="store_false",
                        help="skip removing prompts that overlap evaluation sets")
    parser.add_argument("--suites", type=_names, default=(),
                        help="evaluation suites to decontaminate against (default: all)")
    parser.add_argument("--data-dir", type=Path,
                        help="local copies of the evaluation sets (else the hub)")
    parser.add_argument("--embedding-decontamination", action="store_true",
                        help="also compare prompt embeddings with the evaluation prompts")
    parser.add_argument("--scrub", action="store_true",
                        help="replace personal data (e-mail, phone, card, IP, IBAN...)")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--benign-ratio", type=float, default=0.0,
                        help="benign passed cases to mix into train, per corrected record")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--template", default="deepseek-r1-distill",
                        help="chat template the pairs' prompts are rendered with")
    parser.add_argument("--batch-size", type=int, default=500, help="cases read per batch")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--save-to-disk", action="store_true",
                        help="also write a datasets folder (DIR/datasets/<config>)")
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help="push both configs to this hub dataset repo after writing")
    parser.add_argument("--licence", default=CARD_LICENCE, help="the card's licence field")
    parser.set_defaults(handler=run_harvest)
    imports = parser.add_subparsers(dest="harvest_action", required=False)
    importer = imports.add_parser("import", help="a public set in the same record form")
    importer.add_argument("name", help="unsafechain, star1 or safechain")
    importer.add_argument("--path", type=Path, help="a local copy (else the hub)")
    importer.add_argument("--out", dest="import_out", type=Path, required=True)
    importer.set_defaults(handler=run_import)


def _when(value: str) -> float:
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO date or time, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _labels(value: str) -> tuple[str | None, ...]:
    known = ("confirmed", "false_positive", "bad_correction", "none")
    names = _names(value)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown labels {unknown}; known: {list(known)}")
    return tuple(None if name == "none" else name for name in names)


def _fail(message: str) -> int:
    print(f"guardrail harvest: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return 2


def options_from(args: argparse.Namespace) -> HarvestConfig:
    known = {name for name in HarvestConfig.__dataclass_fields__}
    return HarvestConfig(**{key: value for key, value in vars(args).items() if key in known})


def run_harvest(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = options_from(args)
    if not options.dry_run and options.out is None:
        return _fail("--out DIR is required (or --dry-run)")
    if options.out is not None and options.out.exists() and not options.overwrite \
            and not options.dry_run:
        return _fail(f"{options.out} exists; choose another --out or pass --overwrite")
    try:
        config = load_config(options.config)
        store_url = options.store or config.store.url
        result = asyncio.run(harvest(options, config, store_url))
    except GuardrailError as error:
        return _fail(str(error))
    except ValueError as error:  # an option the filters reject (a threshold out of range...)
        return _fail(str(error))
    print(f"guardrail harvest: {result.funnel.line()}", file=sys.stderr, flush=True)
    if options.dry_run or options.out is None:
        return 0
    try:
        write(result, options, options.out)
    except OSError as error:
        return _fail(f"{options.out}: cannot write ({error})")
    print(f"guardrail harvest: wrote {len(result.train):,} + {len(result.test):,} records and "
          f"{len(result.pairs_train):,} + {len(result.pairs_test):,} pairs to {options.out}",
          file=sys.stderr, flush=True)
    if options.push_to_hub:
        _push(options.out, options.push_to_hub)
    return 0


def _push(folder: Path, repo: str) -> None:
    """Both configs to a hub dataset repo, with the card (needs a token: HF_TOKEN)."""
    import datasets

    for config_name, (train, test) in FILES.items():
        dataset = datasets.load_dataset(
            "json", data_files={"train": str(folder / train), "test": str(folder / test)})
        dataset.push_to_hub(repo, config_name=config_name)
    from huggingface_hub import DatasetCard

    DatasetCard.load(str(folder / "README.md")).push_to_hub(repo)


def run_import(args: argparse.Namespace) -> int:
    from offline.harvest.importers import import_public_set
    from offline.harvest.records import write_jsonl

    try:
        imported = import_public_set(args.name, args.path)
    except GuardrailError as error:
        return _fail(str(error))
    count = write_jsonl(args.import_out, (record.to_dict() for record in imported.kept))
    skipped = ", ".join(f"{reason}: {n}" for reason, n in imported.removed.items())
    if skipped:
        print(f"guardrail harvest import: skipped {skipped}", file=sys.stderr, flush=True)
    print(f"guardrail harvest import: {count:,} records from {args.name} to {args.import_out}",
          file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardrail")
    add_harvest_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["harvest", *(argv or sys.argv[1:])])
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
