"""Guard input stays proportional to the trace: the bounded view against the naive re-check.

Whitespace tokens keep this fast; ``python -m benchmarks.guard_growth`` prints the same figures
with the MiniLM tokenizer.
"""

from __future__ import annotations

import itertools

import pytest

from benchmarks.guard_growth import (
    LENGTHS,
    LIMIT,
    REQUEST,
    WIDE,
    GrowthRow,
    check_naive_count,
    judge,
    main,
    measure,
    whitespace_tokens,
)
from guardrail.config import GuardConfig, StreamConfig

pytestmark = pytest.mark.timeout(60)


def rows_for(window: int, **stream: object) -> list[GrowthRow]:
    guard = GuardConfig(window_steps=window)
    config = StreamConfig.model_validate(stream)
    return [measure(length, whitespace_tokens, guard=guard, stream=config) for length in LENGTHS]


def test_the_defaults_are_within_the_bound_and_flat() -> None:
    rows = rows_for(GuardConfig().window_steps)
    ratios = [row.bounded_ratio for row in rows]
    assert all(ratio <= LIMIT for ratio in ratios), ratios
    assert max(ratios) - min(ratios) < 0.1, ratios
    # The synthetic traces reach their target length.
    assert all(row.trace_tokens >= length for row, length in zip(rows, LENGTHS, strict=True))
    verdicts = judge(rows)
    assert verdicts.flat and verdicts.within and verdicts.grows


@pytest.mark.parametrize("window", [0, 1, 4])
def test_bounded_is_flat_and_naive_grows(window: int) -> None:
    rows = rows_for(window)
    bounded = [row.bounded_ratio for row in rows]
    naive = [row.naive_ratio for row in rows]
    assert max(bounded) <= min(bounded) * 1.1, bounded
    # Quadrupling the trace roughly quadruples the naive ratio (quadratic total cost).
    for earlier, later in itertools.pairwise(naive):
        assert later > 3 * earlier, naive
    # Each check stays small: the largest view does not grow with the trace.
    largest = [row.max_view_tokens for row in rows]
    assert largest[-1] < 2 * largest[0], largest
    # Every trace token is sent with its own step and the next `window` steps' checks, the
    # request once per check: the ratio is about 1 + window + request tokens per step (a bit
    # less on short traces, where the last steps' tokens miss their later checks).
    for row in rows:
        request_share = whitespace_tokens(REQUEST) * row.steps / row.trace_tokens
        assert row.bounded_ratio == pytest.approx(1 + window + request_share, abs=0.25)


def test_a_wide_window_exceeds_the_bound() -> None:
    """Why the defaults are what they are: four steps of context and sentence-sized steps send
    each trace token about six times (see the benchmark's docstring)."""
    rows = rows_for(WIDE["window_steps"], min_step_chars=WIDE["min_step_chars"])
    assert not judge(rows).within


def test_naive_shortcut_matches_rendered_views() -> None:
    check_naive_count(whitespace_tokens, GuardConfig(), StreamConfig())


def test_the_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tokens", "whitespace"]) == 0
    printed = capsys.readouterr().out
    assert "within the bound of 3" in printed and "ABOVE the bound of 3" in printed
    # A chosen setting above the bound fails the run.
    assert main(["--tokens", "whitespace", "--window", "4"]) == 1
    assert main(["--tokens", "whitespace", "--window", "1", "--min-step-chars", "120"]) == 0
