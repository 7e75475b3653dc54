"""What Inspect loads from this package (the ``inspect_ai`` entry point in pyproject.toml): our
model providers, the hook that closes judges, and the benchmark tasks."""

from offline.eval.hooks import CloseJudges
from offline.eval.providers import guardrail_hf, guardrail_openai
from offline.eval.tasks import (
    aime2024,
    gsm8k,
    harmbench,
    jbb,
    math500,
    or_bench,
    strongreject,
    wildjailbreak,
    xstest,
)

__all__ = ["CloseJudges", "aime2024", "gsm8k", "guardrail_hf", "guardrail_openai", "harmbench",
           "jbb", "math500", "or_bench", "strongreject", "wildjailbreak", "xstest"]
