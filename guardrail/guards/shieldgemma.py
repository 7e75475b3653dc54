"""``guard.kind: shieldgemma``: Google ShieldGemma (2B, 9B, 27B), in-process or over an endpoint.

ShieldGemma judges one policy per prompt, so a check asks every configured policy
(``guard.options.policies``; the four of the model card by default) and the step's score is the
highest P(Yes) among them; its categories are the policies at or above ``guard.threshold``.

In-process: the policy prompts of a check are scored in the same micro-batched forward pass,
reading the next-token probabilities of ``Yes`` and ``No`` (the model card's recipe).
Endpoint (``guard.url``): one chat request per policy, concurrently, with
``chat_template_kwargs.guideline`` and ``max_tokens: 1``; the score comes from the logprobs.
"""

from __future__ import annotations

import asyncio

from guardrail.config import GuardConfig
from guardrail.guards.base import Guard, GuardView
from guardrail.guards.chat_endpoint import answer_probabilities
from guardrail.guards.generative_base import (
    EndpointGuard,
    LocalGuard,
    Reading,
    chat_messages,
    is_prompt_check,
)
from guardrail.guards.shieldgemma_format import (
    DEFAULT_MODEL,
    MARKERS,
    OPTIONS,
    Policy,
    parse_output,
    policies_from_options,
    render_prompt,
)


def create_shieldgemma(config: GuardConfig) -> Guard:
    """The endpoint variant when ``guard.url`` is set, the in-process one otherwise."""
    if config.url:
        return ShieldGemmaEndpoint(config)
    return ShieldGemmaLocal(config)


def _reading(policies: tuple[Policy, ...], scores: list[float | None], answers: list[bool],
             threshold: float, source: str) -> Reading:
    """One Reading from the per-policy answers: the worst policy decides."""
    known = [(policy.name, score) for policy, score in zip(policies, scores, strict=True)
             if score is not None]
    flagged = [name for name, score in sorted(known, key=lambda item: -item[1])
               if score >= threshold]
    said = [policy.name for policy, answer in zip(policies, answers, strict=True) if answer]
    extra = {f"p_{name}": f"{score:.4f}" for name, score in known}
    return Reading(
        text_unsafe=bool(said),
        # With any policy unscored the text decides, so a missing logprob cannot hide a Yes.
        score=max(score for _, score in known) if len(known) == len(policies) else None,
        categories=tuple(flagged) if len(known) == len(policies) else tuple(said),
        raw=", ".join(f"{policy.name}: {'Yes' if answer else 'No'}"
                      for policy, answer in zip(policies, answers, strict=True)),
        score_source=source,
        extra=extra,
    )


class ShieldGemmaLocal(LocalGuard):
    name = "shieldgemma"
    options = OPTIONS

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config, default_model=DEFAULT_MODEL, markers=MARKERS)
        self.policies = policies_from_options(config.options)

    def prompts(self, view: GuardView) -> list[str]:
        """One prompt per policy, each ending where the model writes Yes or No."""
        prompt_check = is_prompt_check(view)
        messages = chat_messages(view, self.neutralise)
        prompts: list[str] = []
        for policy in self.policies:
            guideline = policy.guideline(prompt_check)
            rendered = self.runner.render_chat(messages, add_generation_prompt=False,
                                               guideline=guideline)
            if rendered is None:
                response = None if prompt_check else messages[1]["content"]
                rendered = render_prompt(messages[0]["content"], response, guideline,
                                         self.runner.tokenizer.bos_token)
            prompts.append(rendered)
        return prompts

    async def _read(self, view: GuardView) -> Reading:
        prompts = self.prompts(view)
        ids = self.runner.continuation_ids(prompts[0], ("Yes", "No"))
        results = await asyncio.gather(*(self.runner.score(prompt, ids) for prompt in prompts))
        scores: list[float | None] = [
            p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5 for p_yes, p_no in results
        ]
        answers = [p_yes > p_no for p_yes, p_no in results]
        return _reading(self.policies, scores, answers, self.config.threshold, "logits")


class ShieldGemmaEndpoint(EndpointGuard):
    name = "shieldgemma"
    options = OPTIONS

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config, default_model=DEFAULT_MODEL, markers=MARKERS)
        self.policies = policies_from_options(config.options)

    async def _read(self, view: GuardView) -> Reading:
        prompt_check = is_prompt_check(view)
        messages = chat_messages(view, self.neutralise)
        results = await asyncio.gather(*(
            self.endpoint.chat(messages, max_tokens=1,
                               template_kwargs={"guideline": policy.guideline(prompt_check)})
            for policy in self.policies
        ), return_exceptions=True)  # every request finishes before an error is raised
        scores: list[float | None] = []
        answers: list[bool] = []
        for completion in results:
            if isinstance(completion, BaseException):
                raise completion
            violates, at = parse_output(completion.text)
            answers.append(violates)
            probabilities = answer_probabilities(completion, at, ("yes", "no"))
            scores.append(None if probabilities is None else probabilities["yes"])
        return _reading(self.policies, scores, answers, self.config.threshold, "logprobs")
