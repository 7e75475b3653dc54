"""``guardrail correct``: UnsafeChain's correction step, offline.

    guardrail correct --in unsafe.jsonl --out corrected.jsonl --model openai/gpt-4.1 \\
        [--api-base URL] [--api-key-env NAME] [--concurrency 8] [--max-retries 4]

For cases that were only refused online, or unsafe completions a team brings: a strong model
(any LiteLLM model string) rewrites each unsafe completion into safe reasoning + answer, with the
proxy's own rewrite prompt (:func:`guardrail.correctors.rewrite.correction_messages`).

Input lines: ``prompt`` (the user's request) and ``unsafe_response`` (or ``response``): the unsafe
completion; optional ``prefix``: safe reasoning already shown, which the correction continues
(default none: the whole completion is corrected); provenance (``category``, ``score``,
``guard``, ``case_id``, ``label``, ``source``) is carried over. Output: one UnsafeChain record
per corrected row (``correction: "rewrite"``), in input order, written atomically.

- At most ``--concurrency`` calls in flight; a call that fails with a rate limit, a timeout, a
  connection error or a 5xx is retried up to ``--max-retries`` times with exponential backoff
  and jitter; other errors (bad request, auth, unknown model) are not retried.
- Every response is cached by the hash of its request in ``OUT.cache.jsonl``: a restarted run
  calls the model only for rows it has no response for.
- Only ``finish_reason == "stop"`` is accepted, and the output must hold ``</think>`` and a
  non-empty answer. Rows not corrected go to ``OUT.rejected.jsonl`` with the reason (nothing
  is dropped silently).
- A progress bar (tqdm, on a terminal) and a summary on stderr (and ``--summary FILE``): rows,
  calls, cached, retries, tokens and cost (LiteLLM's price map; ``null`` for a model it does not
  price).

Exit status: 0 when every row was corrected, 1 when some were rejected, 2 for a bad invocation
or an unreadable input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardrail.config import Config, load_config
from guardrail.correctors.rewrite import correction_messages
from guardrail.errors import ConfigError
from offline.harvest.correction_cache import CachedResponse, ResponseCache, request_key
from offline.harvest.records import (
    BadRow,
    RecordError,
    UnsafeChainRecord,
    format_response,
    read_jsonl,
    split_response,
    write_jsonl,
)

# Without this, importing litellm fetches its price map from GitHub (see the LiteLLM upstream).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

_RETRY_STATUS = frozenset({408, 409, 429})
_PROVENANCE = ("category", "score", "guard", "case_id", "label", "source")


@dataclass(frozen=True, slots=True)
class CorrectOptions:
    model: str
    api_base: str | None = None
    api_key: str | None = None
    concurrency: int = 8
    max_retries: int = 4
    retry_wait_s: float = 1.0
    """The first backoff; doubled on each retry, capped at 60 s, with jitter."""
    max_tokens: int = 4096
    temperature: float = 0.0
    timeout_s: float = 600.0
    progress: bool | None = None
    """None: a bar only on a terminal."""


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    prompt: str
    prefix: str
    withheld: str
    provenance: dict[str, Any]


@dataclass
class Summary:
    rows: int = 0
    corrected: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    cached: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0

    def add_usage(self, entry: CachedResponse) -> None:
        self.prompt_tokens += entry.prompt_tokens
        self.completion_tokens += entry.completion_tokens
        if entry.cost_usd is None:
            self.cost_usd = None
        elif self.cost_usd is not None:
            self.cost_usd += entry.cost_usd

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "corrected": self.corrected,
                "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(sorted(self.rejected.items())),
                "calls": self.calls, "cached": self.cached, "retries": self.retries,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 8)}

    def line(self) -> str:
        cost = "unknown" if self.cost_usd is None else f"${self.cost_usd:.6f}"
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.rejected.items()))
        return (f"corrected {self.corrected}/{self.rows} rows"
                f"{f' (rejected: {reasons})' if reasons else ''}; {self.calls} calls, "
                f"{self.cached} from cache, {self.retries} retries; tokens "
                f"{self.prompt_tokens} in / {self.completion_tokens} out; cost {cost}")


@dataclass(frozen=True, slots=True)
class Outcome:
    row: Row
    record: UnsafeChainRecord | None
    reason: str | None = None


def parse_row(line: int, data: Any) -> Row:
    if not isinstance(data, dict):
        raise RecordError("a row is a JSON object")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecordError("'prompt': a non-empty string is required")
    withheld = data.get("unsafe_response", data.get("response"))
    if not isinstance(withheld, str) or not withheld.strip():
        raise RecordError("'unsafe_response' (or 'response'): a non-empty string is required")
    prefix = data.get("prefix", "")
    if not isinstance(prefix, str):
        raise RecordError("'prefix': a string is required")
    provenance = {key: data[key] for key in _PROVENANCE if key in data}
    # Checked now, before a call is paid for: the record is built from it at the end.
    UnsafeChainRecord.from_dict({"prompt": prompt, "response": withheld, **provenance})
    return Row(line, prompt, prefix, withheld, provenance)


def build_request(row: Row, options: CorrectOptions) -> dict[str, Any]:
    """What is sent (and hashed): the model, the rewrite prompt and the sampling settings."""
    return {"model": options.model, "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "messages": correction_messages([{"role": "user", "content": row.prompt}],
                                            row.prefix, row.withheld)}


def to_record(row: Row, entry: CachedResponse) -> Outcome:
    if entry.finish_reason != "stop":
        return Outcome(row, None, f"finish_reason:{entry.finish_reason}")
    parsed = split_response(entry.content)
    if not parsed.tagged or not parsed.answer:
        return Outcome(row, None, "no_answer")
    reasoning = _join(row.prefix, parsed.reasoning)
    provenance = dict(row.provenance)
    provenance.setdefault("source", "correct")
    try:
        record = UnsafeChainRecord.from_dict({
            "prompt": row.prompt, "response": format_response(reasoning, parsed.answer),
            "unsafe_response": row.withheld, "correction": "rewrite", **provenance})
    except RecordError as error:
        return Outcome(row, None, f"bad_provenance: {error}")
    return Outcome(row, record)


def _join(prefix: str, continuation: str) -> str:
    if not prefix.strip():
        return continuation
    if not continuation or prefix[-1].isspace() or continuation[0].isspace():
        return prefix + continuation
    return f"{prefix} {continuation}"


def _retryable(error: BaseException) -> bool:
    import litellm

    if isinstance(error, litellm.exceptions.BadRequestError | litellm.exceptions.AuthenticationError
                  | litellm.exceptions.NotFoundError | litellm.exceptions.PermissionDeniedError):
        return False
    status = getattr(error, "status_code", None)
    if isinstance(status, int):
        return status in _RETRY_STATUS or status >= 500
    return isinstance(error, litellm.exceptions.APIConnectionError | litellm.exceptions.Timeout
                      | asyncio.TimeoutError | ConnectionError)


def _cost(litellm: Any, response: Any) -> float | None:
    try:
        cost = litellm.completion_cost(completion_response=response)
    except Exception:  # LiteLLM raises for models its price map does not know
        return None
    return float(cost) if cost is not None else None


class Corrector:
    """Runs the requests: a limit on calls in flight, retries, the cache."""

    def __init__(self, options: CorrectOptions, cache: ResponseCache, summary: Summary) -> None:
        import litellm

        litellm.suppress_debug_info = True  # no "Provider List" banners on errors
        self.litellm: Any = litellm
        self.options = options
        self.cache = cache
        self.summary = summary
        self.limit = asyncio.Semaphore(options.concurrency)
        # One call per distinct request, however many rows share it.
        self.pending: dict[str, asyncio.Task[CachedResponse]] = {}

    def response(self, request: dict[str, Any]) -> asyncio.Task[CachedResponse] | CachedResponse:
        key = request_key(request)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if key not in self.pending:
            self.pending[key] = asyncio.create_task(self._call(key, request))
        return self.pending[key]

    async def _call(self, key: str, request: dict[str, Any]) -> CachedResponse:
        options = self.options
        attempt = 0
        while True:
            async with self.limit:
                self.summary.calls += 1
                try:
                    response = await self.litellm.acompletion(
                        **request, api_base=options.api_base, api_key=options.api_key,
                        timeout=options.timeout_s, num_retries=0, max_retries=0)
                    break
                except Exception as error:
                    if attempt >= options.max_retries or not _retryable(error):
                        raise
            attempt += 1
            self.summary.retries += 1
            wait = min(60.0, options.retry_wait_s * 2 ** (attempt - 1))
            await asyncio.sleep(wait * (0.5 + random.random() / 2))
        choice = response.choices[0]
        usage = getattr(response, "usage", None)
        entry = CachedResponse(
            key=key, content=choice.message.content or "", finish_reason=choice.finish_reason,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            cost_usd=_cost(self.litellm, response))
        self.cache.put(entry)
        self.summary.add_usage(entry)
        return entry

    async def correct(self, row: Row) -> Outcome:
        pending = self.response(build_request(row, self.options))
        if isinstance(pending, CachedResponse):
            self.summary.cached += 1
            return to_record(row, pending)
        try:
            entry = await pending
        except Exception as error:
            return Outcome(row, None, f"error:{type(error).__name__}")
        return to_record(row, entry)


async def correct_rows(rows: Sequence[Row], options: CorrectOptions, cache: ResponseCache,
                       summary: Summary) -> list[Outcome]:
    """Every row corrected (or rejected with a reason), in input order."""
    from tqdm import tqdm

    corrector = Corrector(options, cache, summary)
    summary.rows += len(rows)
    with tqdm(total=len(rows), desc="correct", unit="row", file=sys.stderr,
              disable=None if options.progress is None else not options.progress) as bar:

        async def one(row: Row) -> Outcome:
            outcome = await corrector.correct(row)
            bar.update(1)
            return outcome

        outcomes = await asyncio.gather(*(one(row) for row in rows))
    for outcome in outcomes:
        if outcome.record is not None:
            summary.corrected += 1
        else:
            summary.rejected[(outcome.reason or "").split(":")[0]] += 1
    return list(outcomes)


def _outputs(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".cache.jsonl"), out.with_name(out.name + ".rejected.jsonl")


def run_correct(args: argparse.Namespace) -> int:
    source = Path(args.input)
    out = Path(args.out)
    if not source.is_file():
        return _fail(f"--in {source}: no such file")
    if out.resolve() == source.resolve():
        return _fail("--out must not be the input file")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            return _fail(f"--api-key-env {args.api_key_env}: that variable is not set")
    options = CorrectOptions(
        model=args.model, api_base=args.api_base, api_key=api_key,
        concurrency=args.concurrency, max_retries=args.max_retries,
        retry_wait_s=args.retry_wait, max_tokens=args.max_tokens,
        temperature=args.temperature, timeout_s=args.timeout,
        progress=False if args.no_progress else None)
    rows: list[Row] = []
    rejected: list[dict[str, Any]] = []
    summary = Summary()
    try:
        for item in read_jsonl(source):
            if isinstance(item, BadRow):
                rejected.append({"line": item.line, "reason": f"bad_row: {item.problem}"})
                continue
            number, data = item
            try:
                rows.append(parse_row(number, data))
            except RecordError as error:
                rejected.append({"line": number, "reason": f"bad_row: {error}"})
    except (OSError, UnicodeDecodeError) as error:
        return _fail(f"--in {source}: cannot read ({error})")
    for entry in rejected:
        print(f"line {entry['line']}: {entry['reason']}", file=sys.stderr)
    summary.rows += len(rejected)
    if rejected:
        summary.rejected["bad_row"] += len(rejected)
    cache_path, rejected_path = _outputs(out)
    cache = ResponseCache(cache_path)
    try:
        outcomes = asyncio.run(correct_rows(rows, options, cache, summary))
    except KeyboardInterrupt:
        return _fail("interrupted: finished rows are cached; run again to resume")
    finally:
        cache.close()
    if args.rejudge:
        try:
            outcomes = asyncio.run(rejudge(outcomes, load_config(args.config), summary))
        except ConfigError as error:
            return _fail(f"config error: {error}")
    rejected.extend({"line": outcome.row.line, "reason": outcome.reason,
                     "prompt": outcome.row.prompt}
                    for outcome in outcomes if outcome.record is None)
    write_jsonl(out, (outcome.record.to_dict() for outcome in outcomes
                      if outcome.record is not None))
    if rejected:
        write_jsonl(rejected_path, sorted(rejected, key=lambda entry: int(entry["line"])))
    elif rejected_path.exists():
        rejected_path.unlink()
    print(summary.line(), file=sys.stderr)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary.as_dict(), indent=2) + "\n",
                                      encoding="utf-8")
    return 1 if rejected else 0


async def rejudge(outcomes: Sequence[Outcome], config: Config, summary: Summary
                  ) -> list[Outcome]:
    """Every corrected record judged again by the config's guard, as the proxy would judge
    it; one with an unsafe step (or one the guard could not judge) is rejected."""
    from guardrail.guards import build_guard
    from guardrail.guards.capabilities import warm_up
    from guardrail.step_checker import StepChecker
    from offline.check import judge_response

    guard = build_guard(config.guard)
    checked: list[Outcome] = []
    try:
        await warm_up(guard)
        checker = StepChecker(guard, config.guard)
        for outcome in outcomes:
            record = outcome.record
            if record is None:
                checked.append(outcome)
                continue
            parsed = record.parsed
            verdicts = await judge_response(checker, config, record.prompt, parsed.reasoning,
                                            parsed.answer)
            reason = ("guard_error" if any(verdict.error for verdict in verdicts)
                      else "judged_unsafe" if any(verdict.unsafe for verdict in verdicts)
                      else None)
            if reason is None:
                checked.append(outcome)
                continue
            summary.corrected -= 1
            summary.rejected[reason] += 1
            checked.append(Outcome(outcome.row, None, reason))
    finally:
        await guard.aclose()
    return checked


def add_correct_parser(commands: Any) -> None:
    """Adds ``correct`` to the ``guardrail`` command's subcommands."""
    parser = commands.add_parser(
        "correct", help="rewrite unsafe completions into safe reasoning + answer (UnsafeChain)",
        description="UnsafeChain's correction step: a strong model (through LiteLLM) rewrites "
                    "each unsafe completion into safe reasoning and an answer. Input lines: "
                    '{"prompt", "unsafe_response", ["prefix"]}; output: UnsafeChain records.')
    parser.add_argument("--in", dest="input", required=True, metavar="FILE.jsonl")
    parser.add_argument("--out", required=True, metavar="FILE.jsonl",
                        help="written at the end; its cache (FILE.cache.jsonl) and rejects "
                             "(FILE.rejected.jsonl) sit beside it")
    parser.add_argument("--model", required=True,
                        help="a LiteLLM model string, e.g. openai/gpt-4.1")
    parser.add_argument("--api-base", help="the endpoint (an OpenAI-compatible server...)")
    parser.add_argument("--api-key-env", metavar="NAME",
                        help="environment variable holding the API key (default: LiteLLM's "
                             "own, e.g. OPENAI_API_KEY)")
    parser.add_argument("--concurrency", type=_positive, default=8,
                        help="calls in flight at most (default 8)")
    parser.add_argument("--max-retries", type=_non_negative, default=4,
                        help="retries per call on rate limits, timeouts, 5xx (default 4)")
    parser.add_argument("--retry-wait", type=float, default=1.0, metavar="SECONDS",
                        help="first backoff, doubled per retry (default 1)")
    parser.add_argument("--max-tokens", type=_positive, default=4096)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="per call (default 600)")
    parser.add_argument("--config", help="the proxy's YAML config: its guard re-judges every "
                                         "corrected record (default: laptop defaults)")
    parser.add_argument("--no-rejudge", dest="rejudge", action="store_false",
                        help="keep corrected records without judging them again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--summary", metavar="FILE", help="also write the summary as JSON")
    parser.set_defaults(handler=run_correct)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return number


def _fail(message: str) -> int:
    print(f"guardrail correct: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardrail")
    add_correct_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["correct", *(sys.argv[1:] if argv is None else argv)])
    handler: Any = args.handler
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
