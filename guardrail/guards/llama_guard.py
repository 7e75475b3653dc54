"""``guard.kind: llama-guard``: Llama Guard 3 (1B, 8B) over an endpoint or in-process.

With ``guard.url`` the checks go to an OpenAI-compatible server (``LlamaGuardEndpoint``); without
it the model runs here with transformers, from ``guard.model`` (a local folder or a hub id;
default ``meta-llama/Llama-Guard-3-1B``).

In-process, a check is one forward pass: the prompt is the tokenizer's own chat template applied
to ``[user, assistant]`` (the Llama Guard 3 format written by ``render_prompt`` when the
tokenizer has no template), followed by the ``\\n\\n`` the model writes before its verdict, and
the score is P(``unsafe``) / (P(``unsafe``) + P(``safe``)) for the next token. Only a flagged
step pays for more: a short greedy continuation after ``unsafe\\n`` reads its categories.
Concurrent checks share micro-batched forward passes (``HFRunner``).
"""

from __future__ import annotations

from guardrail.config import GuardConfig
from guardrail.guards.base import Guard, GuardView
from guardrail.guards.generative_base import LocalGuard, Reading
from guardrail.guards.llama_guard_endpoint import DEFAULT_MODEL, LlamaGuardEndpoint
from guardrail.guards.llama_guard_format import (
    MARKERS,
    build_messages,
    parse_categories,
    render_prompt,
)

ANSWERS = ("unsafe", "safe")
CATEGORY_TOKENS = 12
"""Room for ``S1,S10,S14``; the model stops by itself before."""


def create_llama_guard(config: GuardConfig) -> Guard:
    """The endpoint variant when ``guard.url`` is set, the in-process one otherwise."""
    if config.url:
        return LlamaGuardEndpoint(config)
    return LlamaGuardLocal(config)


class LlamaGuardLocal(LocalGuard):
    name = "llama-guard"

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config, default_model=DEFAULT_MODEL, markers=MARKERS)

    def prompt(self, view: GuardView) -> str:
        """The exact text the model reads for ``view``, up to where its verdict word goes."""
        messages = build_messages(view, self.markers)
        rendered = self.runner.render_chat(messages, add_generation_prompt=False)
        if rendered is None:
            rendered = render_prompt(messages, self.runner.tokenizer.bos_token)
        # The template stops at the assistant header; the model's first output is "\n\n".
        return rendered if rendered.endswith("\n\n") else rendered + "\n\n"

    async def _read(self, view: GuardView) -> Reading:
        prompt = self.prompt(view)
        ids = self.runner.continuation_ids(prompt, ANSWERS)
        p_unsafe, p_safe = await self.runner.score(prompt, ids)
        score = p_unsafe / (p_unsafe + p_safe) if p_unsafe + p_safe > 0 else 0.5
        text_unsafe = p_unsafe > p_safe
        categories: tuple[str, ...] = ()
        raw = "unsafe" if text_unsafe else "safe"
        if score >= self.config.threshold:
            continuation = await self.runner.generate(prompt + "unsafe\n", CATEGORY_TOKENS)
            line = continuation.text.strip().splitlines()
            categories = parse_categories(line[0]) if line else ()
            raw = "unsafe\n" + continuation.text.strip()
        return Reading(
            text_unsafe=text_unsafe, score=score, categories=categories, raw=raw,
            score_source="logits",
            extra={"p_answer": f"{p_unsafe + p_safe:.4f}"},
        )
