"""``guardrail check``: judge text with the configured guard, outside the proxy.

    guardrail check [--config FILE] --text "some response"
    guardrail check [--config FILE] --input cases.jsonl [--steps] [--batch-size 32]

Input lines are ``{"prompt": ..., "response": ...}`` (``prompt`` may be left out; ``id`` and a
``label`` are optional). Each response is judged as a whole, as one view whose step is the
response; with ``--steps`` it is also split into steps and judged step by step exactly as the
proxy judges a stream, and is unsafe if the whole or any step is. One JSON line per input goes
to stdout, in input order:

    {"line": 3, "unsafe": true, "score": 0.97, "categories": ["S9"]}

``score`` is the guard's own (1.0 / 0.0 from the verdict for guards that give none). Every view
is judged by the proxy's own step checker (refusal rule, timeout, ``guard.on_error``). A line the
guard could not judge gets ``error`` and what ``guard.on_error`` decides, as in the proxy; a
line that is not valid input is reported on stderr with its number and skipped. With labels
(``"label": true`` / ``"unsafe"`` / ``1`` for harmful), the summary on stderr (and in
``--summary FILE`` as JSON) adds precision, recall, F1 and the false-positive rate.

Exit status: 0 when every line was judged, 1 when some were bad or failed, 2 for a bad config or
an unreadable input file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from guardrail.config import Config, load_config
from guardrail.errors import ConfigError, UnknownBackendError
from guardrail.events import Channel
from guardrail.guards.base import Guard, GuardView, Verdict
from guardrail.guards.capabilities import warm_up
from guardrail.step_checker import StepChecker
from guardrail.steps import StepSplitter
from guardrail.views import build_view, request_text

_LABELS_UNSAFE = frozenset({"unsafe", "harmful", "true", "yes", "1"})
_LABELS_SAFE = frozenset({"safe", "unharmful", "harmless", "benign", "false", "no", "0"})


@dataclass
class Item:
    """One input to judge."""

    line: int | None
    prompt: str
    response: str
    id: Any = None
    label: bool | None = None
    views: list[GuardView] = field(default_factory=list)
    """views[0] is the whole response; any further ones are its steps."""


@dataclass
class BadLine:
    line: int
    problem: str


@dataclass
class Summary:
    judged: int = 0
    unsafe: int = 0
    errors: int = 0
    bad_lines: int = 0
    # Confusion counts over labelled, judged lines (unsafe is the positive class).
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def count(self, item: Item, unsafe: bool, failed: bool) -> None:
        self.judged += 1
        self.unsafe += unsafe
        self.errors += failed
        if item.label is None or failed:
            return
        if item.label:
            self.tp += unsafe
            self.fn += not unsafe
        else:
            self.fp += unsafe
            self.tn += not unsafe

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"judged": self.judged, "unsafe": self.unsafe,
                                  "errors": self.errors, "bad_lines": self.bad_lines}
        labelled = self.tp + self.fp + self.tn + self.fn
        if labelled:
            precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
            recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
            f1 = (2 * precision * recall / (precision + recall)) if precision + recall else 0.0
            result.update(
                labelled=labelled, harmful=self.tp + self.fn, benign=self.fp + self.tn,
                tp=self.tp, fp=self.fp, tn=self.tn, fn=self.fn,
                precision=round(precision, 4), recall=round(recall, 4), f1=round(f1, 4),
                false_positive_rate=round(self.fp / (self.fp + self.tn), 4)
                if self.fp + self.tn else None,
                accuracy=round((self.tp + self.tn) / labelled, 4),
            )
        return result

    def line(self) -> str:
        data = self.as_dict()
        text = (f"{data['judged']} judged, {data['unsafe']} unsafe, {data['errors']} errors, "
                f"{data['bad_lines']} bad lines")
        if "labelled" in data:
            fpr = data["false_positive_rate"]
            text += (f"; on {data['labelled']} labelled: precision {data['precision']:.3f}, "
                     f"recall {data['recall']:.3f}, F1 {data['f1']:.3f}, false-positive rate "
                     + ("n/a" if fpr is None else f"{fpr:.3f}"))
        return text


# -- reading input ------------------------------------------------------------------------------


def _label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _LABELS_UNSAFE:
            return True
        if word in _LABELS_SAFE:
            return False
    raise ValueError(f"'label' must be true/false, 1/0, or unsafe/safe, not {value!r}")


def parse_line(number: int, raw: bytes) -> Item | BadLine | None:
    """One input line; None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return BadLine(number, "not UTF-8 text")
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return BadLine(number, f"not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(data, dict):
        return BadLine(number, f"expected a JSON object with \"prompt\" and \"response\", "
                               f"got {type(data).__name__}")
    response = data.get("response")
    if not isinstance(response, str):
        problem = "missing" if "response" not in data else f"got {type(response).__name__}"
        return BadLine(number, f"\"response\" must be a string ({problem})")
    prompt = data.get("prompt")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        return BadLine(number, f"\"prompt\" must be a string (got {type(prompt).__name__})")
    label: bool | None = None
    if data.get("label") is not None:
        try:
            label = _label(data["label"])
        except ValueError as error:
            return BadLine(number, str(error))
    return Item(line=number, prompt=prompt, response=response, id=data.get("id"), label=label)


def read_items(stream: IO[bytes]) -> Iterator[Item | BadLine]:
    for number, raw in enumerate(stream, start=1):
        parsed = parse_line(number, raw)
        if parsed is not None:
            yield parsed


# -- judging ------------------------------------------------------------------------------------


def build_views(item: Item, config: Config, channel: Channel, steps: bool) -> list[GuardView]:
    """The whole response as one view (no context), then, with ``steps``, each step's view
    built as the monitor builds it: the request, the last ``window_steps`` steps, the step."""
    guard, stream = config.guard, config.stream
    request = request_text([{"role": "user", "content": item.prompt}], guard.max_request_chars)
    views = [GuardView(request=request, context=(), step=item.response, channel=channel)]
    if not steps:
        return views
    splitter = StepSplitter(stream.split, stream.max_step_chars, stream.min_step_chars)
    pieces = splitter.feed(item.response) + splitter.finish()
    if pieces == [item.response]:
        return views  # one step: the same view as the whole
    history: list[str] = []
    for piece in pieces:
        views.append(build_view(request, history, piece, channel, guard.window_steps))
        history.append(piece)
    return views


async def judge_response(checker: StepChecker, config: Config, prompt: str, reasoning: str,
                         answer: str) -> list[Verdict]:
    """A whole response (reasoning, then answer) judged step by step as the proxy judges a
    stream: the verdict of every step, in order. What ``guardrail harvest`` and ``guardrail
    correct`` re-judge corrected responses with."""
    verdicts: list[Verdict] = []
    channel: Channel
    for channel, text in (("reasoning", reasoning), ("answer", answer)):
        if text.strip():
            views = build_views(Item(line=None, prompt=prompt, response=text), config, channel,
                                True)
            verdicts.extend(await checker.check_many(views[1:] or views))
    return verdicts


def _score(verdict: Verdict) -> float:
    return verdict.score if verdict.score is not None else (1.0 if verdict.unsafe else 0.0)


def result_of(item: Item, outcomes: Sequence[Verdict], config: Config, steps: bool
              ) -> tuple[dict[str, Any], bool, bool]:
    """The output line for an item, and (unsafe, failed)."""
    judged = [outcome for outcome in outcomes if outcome.error is None]
    failures = [outcome.error for outcome in outcomes if outcome.error is not None]
    blocked = bool(failures) and config.guard.on_error == "block"
    unsafe = any(verdict.unsafe for verdict in judged) or blocked
    scores = [_score(verdict) for verdict in judged]
    if failures:
        scores.append(1.0 if blocked else 0.0)
    categories: list[str] = []
    for verdict in judged:
        if verdict.unsafe:
            categories.extend(code for code in verdict.categories if code not in categories)
    if failures:
        categories.append("guard_error")
    result: dict[str, Any] = {}
    if item.line is not None:
        result["line"] = item.line
    if item.id is not None:
        result["id"] = item.id
    result.update(unsafe=unsafe, score=round(max(scores), 6), categories=categories)
    if steps:
        step_outcomes = outcomes[1:] if len(outcomes) > 1 else outcomes
        result["steps"] = len(step_outcomes)
        result["flagged_steps"] = [
            index for index, outcome in enumerate(step_outcomes) if outcome.unsafe
        ]
    if failures:
        result["error"] = failures[0]
    return result, unsafe, bool(failures)


async def judge_stream(
    checker: StepChecker,
    items: Iterator[Item | BadLine],
    config: Config,
    *,
    channel: Channel,
    steps: bool,
    batch_size: int,
    out: IO[str],
    err: IO[str],
    source: str,
) -> Summary:
    """Judges items in batches of about ``batch_size`` views, writing results in order."""
    summary = Summary()
    pending: list[Item] = []
    pending_views = 0

    async def flush() -> None:
        nonlocal pending_views
        views = [view for item in pending for view in item.views]
        outcomes: list[Verdict] = []
        for start in range(0, len(views), batch_size):
            outcomes.extend(await checker.check_many(views[start:start + batch_size]))
        offset = 0
        for item in pending:
            own = outcomes[offset:offset + len(item.views)]
            offset += len(item.views)
            result, unsafe, failed = result_of(item, own, config, steps)
            summary.count(item, unsafe, failed)
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
        pending.clear()
        pending_views = 0

    for entry in items:
        if isinstance(entry, BadLine):
            summary.bad_lines += 1
            err.write(f"guardrail check: {source} line {entry.line}: {entry.problem}\n")
            err.flush()
            continue
        entry.views = build_views(entry, config, channel, steps)
        pending.append(entry)
        pending_views += len(entry.views)
        if pending_views >= batch_size:
            await flush()
    if pending:
        await flush()
    return summary


# -- the command --------------------------------------------------------------------------------


def add_check_parser(commands: Any) -> None:
    """Adds ``check`` to the ``guardrail`` command's subcommands."""
    parser = commands.add_parser(
        "check", help="judge text with the configured guard, one JSON line per input",
        description="Judge text with the configured guard. Input lines are "
                    '{"prompt": ..., "response": ...}; output is one JSON line per input with '
                    "unsafe, score (0-1) and categories.")
    parser.add_argument("--config", help="YAML config file (default: laptop defaults)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="a response to judge (as an answer to an empty request)")
    source.add_argument("--input", metavar="FILE.jsonl",
                        help='JSON lines {"prompt", "response"}; "-" reads stdin')
    parser.add_argument("--steps", action="store_true",
                        help="also judge each step as the proxy does; unsafe if any step is")
    parser.add_argument("--channel", choices=("answer", "reasoning"), default="answer",
                        help="judge the text as the model's answer (default) or its reasoning")
    parser.add_argument("--batch-size", type=_positive, default=16,
                        help="views per guard.check_many call (default 16)")
    parser.add_argument("--summary", metavar="FILE", help="also write the summary as JSON")
    parser.set_defaults(handler=run_check)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _fail(message: str) -> int:
    message = " ".join(message.split())
    print(f"guardrail check: {message}", file=sys.stderr, flush=True)
    return 2


def _build(config: Config) -> Guard:
    from guardrail.guards import GUARDS, build_guard

    if config.guard.kind not in GUARDS.names():
        raise UnknownBackendError(f"guard.kind: unknown guard {config.guard.kind!r}; known: "
                                  f"{', '.join(GUARDS.names())}")
    return build_guard(config.guard)


async def _run(args: argparse.Namespace, config: Config, stream: IO[bytes] | None
               ) -> Summary | int:
    """The summary, or the exit status of a failure to start."""
    try:
        guard = _build(config)
    except ConfigError as error:
        return _fail(f"config error: {error}")
    try:
        try:
            await warm_up(guard)
        except ConfigError as error:
            return _fail(f"config error: {error}")
        if stream is None:
            items: Iterator[Item | BadLine] = iter([Item(line=None, prompt="",
                                                         response=args.text)])
            source = "--text"
        else:
            items = read_items(stream)
            source = "stdin" if args.input == "-" else args.input
        summary = await judge_stream(
            StepChecker(guard, config.guard), items, config, channel=args.channel, steps=args.steps,
            batch_size=args.batch_size, out=sys.stdout, err=sys.stderr, source=source)
    finally:
        await guard.aclose()
    return summary


def run_check(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as error:
        return _fail(f"config error: {error}")
    stream: IO[bytes] | None = None
    if args.input is not None:
        if args.input == "-":
            stream = sys.stdin.buffer
        else:
            try:
                stream = open(args.input, "rb")  # noqa: SIM115 - closed below
            except OSError as error:
                return _fail(f"{args.input}: cannot read ({error.strerror})")
    try:
        outcome = asyncio.run(_run(args, config, stream))
    finally:
        if stream is not None and stream is not sys.stdin.buffer:
            stream.close()
    if isinstance(outcome, int):
        return outcome
    print(f"guardrail check: {outcome.line()}", file=sys.stderr, flush=True)
    if args.summary:
        try:
            Path(args.summary).write_text(json.dumps(outcome.as_dict(), indent=2) + "\n",
                                          encoding="utf-8")
        except OSError as error:
            return _fail(f"{args.summary}: cannot write ({error.strerror})")
    return 0 if outcome.errors == 0 and outcome.bad_lines == 0 else 1
