"""``guard.kind: wildguard``: WildGuard (allenai/wildguard), in-process or over an endpoint.

WildGuard writes three answers before the one that decides a response check (``Harmful
response`` comes last), so unlike the single-word guards it cannot be scored by one forward pass:
each check is a short greedy generation (about 20 tokens). The score is P(yes) / (P(yes) + P(no))
at the step where the deciding answer is written; the text gives the verdict where no score can
be had. ``extra`` records the other answers (``harmful_request``, ``response_refusal``).

Endpoint (``guard.url``, e.g. ``vllm serve allenai/wildguard``): the prompt is rendered here and
sent to ``/completions``, as the model has no chat template; the server adds ``<s>`` itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from guardrail.config import GuardConfig
from guardrail.guards.base import Guard, GuardView
from guardrail.guards.chat_endpoint import answer_probabilities
from guardrail.guards.generative_base import EndpointGuard, LocalGuard, Reading, is_prompt_check
from guardrail.guards.hf_runner import Generated
from guardrail.guards.wildguard_format import (
    DEFAULT_MODEL,
    HARMFUL_REQUEST,
    MARKERS,
    RESPONSE_REFUSAL,
    WildGuardOutput,
    decisive_key,
    parse_output,
    render_prompt,
    verdict_of,
)

ANSWER_TOKENS = 32
"""Room for the three answer lines; the model stops by itself before."""
_BOS = "<s>"


def create_wildguard(config: GuardConfig) -> Guard:
    """The endpoint variant when ``guard.url`` is set, the in-process one otherwise."""
    if config.url:
        return WildGuardEndpoint(config)
    return WildGuardLocal(config)


def _render(view: GuardView, neutralise: Callable[[str], str]) -> str:
    response = "" if is_prompt_check(view) else neutralise(view.response_text())
    return render_prompt(neutralise(view.request), response)


def _extra(output: WildGuardOutput, key: str) -> dict[str, str]:
    """The answers other than the deciding one, for the audit log."""
    names = {HARMFUL_REQUEST: "harmful_request", RESPONSE_REFUSAL: "response_refusal"}
    extra: dict[str, str] = {}
    for name, field in names.items():
        if name != key and name in output.answers:
            answer = output.answers[name]
            extra[field] = "n/a" if answer is None else ("yes" if answer else "no")
    return extra


def _yes_share(p_yes: float, p_no: float) -> float | None:
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else None


class WildGuardLocal(LocalGuard):
    name = "wildguard"

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config, default_model=DEFAULT_MODEL, markers=MARKERS)

    def prompt(self, view: GuardView) -> str:
        return _render(view, self.neutralise)

    def answer_step(self, generated: Generated, key: str) -> int | None:
        """The generation step that wrote the answer to ``key``: the first non-blank token after
        the first ``<key>:`` in the output."""
        after_key = re.compile(rf"{re.escape(key)}\s*:\s*$", re.IGNORECASE)
        for step in range(len(generated.token_ids)):
            if after_key.search(self.runner.decode(generated.token_ids[:step])):
                while step < len(generated.token_ids) and not self.runner.decode(
                    generated.token_ids[step:step + 1]
                ).strip():
                    step += 1
                return step if step < len(generated.token_ids) else None
        return None

    async def _read(self, view: GuardView) -> Reading:
        prompt = self.prompt(view)
        key = decisive_key(is_prompt_check(view))
        yes_no = self.runner.continuation_ids(prompt + HARMFUL_REQUEST + ":", [" yes", " no"])
        generated = await self.runner.generate(prompt, ANSWER_TOKENS, watch=yes_no)
        output = parse_output(generated.text)
        text_unsafe = verdict_of(output, key, generated.text)
        step = self.answer_step(generated, key)
        score = None if step is None else _yes_share(*generated.watched[step])
        return Reading(text_unsafe=text_unsafe, score=score,
                       categories=(key.lower().replace(" ", "_"),) if text_unsafe else (),
                       raw=generated.text, score_source="logits", extra=_extra(output, key))


class WildGuardEndpoint(EndpointGuard):
    name = "wildguard"

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config, default_model=DEFAULT_MODEL, markers=MARKERS)

    async def _read(self, view: GuardView) -> Reading:
        prompt = _render(view, self.neutralise).removeprefix(_BOS)
        completion = await self.endpoint.complete(prompt, max_tokens=ANSWER_TOKENS)
        output = parse_output(completion.text)
        key = decisive_key(is_prompt_check(view))
        text_unsafe = verdict_of(output, key, completion.text)
        probabilities = answer_probabilities(completion, output.value_at[key], ("yes", "no"))
        return Reading(text_unsafe=text_unsafe,
                       score=None if probabilities is None else probabilities["yes"],
                       categories=(key.lower().replace(" ", "_"),) if text_unsafe else (),
                       raw=completion.text, score_source="logprobs", extra=_extra(output, key))
