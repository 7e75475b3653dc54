"""``correction.strategy: intervene`` (IPO's corrective intervention, live).

The flagged step and everything after it are dropped; a safety trigger takes their place; the
same model is asked to go on from there (see guardrail.continuation for the forms). The client
sees one stream: the safe reasoning it already had, the trigger (always in the reasoning), then
the continuation, which the monitor guards like the first attempt.
"""

from __future__ import annotations

from guardrail.config import CorrectionConfig
from guardrail.continuation import (
    AssistantPrefix,
    ChatTemplate,
    ContinuationForm,
    guess_template,
    load_template,
)
from guardrail.correctors.base import CorrectionContext, CorrectionPlan, Corrector
from guardrail.correctors.simple import RefuseCorrector
from guardrail.events import TextDelta
from guardrail.triggers import choose_trigger
from guardrail.upstreams.base import ContinuesTurns, Upstream


def resolve_form(config: CorrectionConfig, upstream: Upstream) -> ContinuationForm | None:
    """The continuation form to use with this upstream, or None when it supports none."""
    if not isinstance(upstream, ContinuesTurns):
        return None
    supported = upstream.continuation_forms
    wanted = config.continuation
    if wanted == "none":
        return None
    if wanted != "auto":
        return wanted if wanted in supported else None
    url = upstream.config.url or ""
    for form in (("deepseek-prefix",) if "deepseek.com" in url else ()) + ("vllm", "restart"):
        if form in supported:
            return form
    return None


def _joined(shown: str, inserted: str) -> str:
    """The trigger starts a new sentence after what was shown."""
    if shown and not shown[-1].isspace():
        return " " + inserted + " "
    return inserted + " "


class InterveneCorrector:
    name = "intervene"

    def __init__(self, config: CorrectionConfig) -> None:
        self.config = config
        self._refuse = RefuseCorrector(config)
        self._fallback: Corrector = self._refuse
        if config.fallback == "rewrite":
            from guardrail.correctors.rewrite import RewriteCorrector

            self._fallback = RewriteCorrector(config)
        self._template: ChatTemplate | None = None
        if config.continuation == "completions" and config.chat_template:
            self._template = load_template(config.chat_template)

    async def plan(self, context: CorrectionContext) -> CorrectionPlan:
        categories = context.verdict.categories
        if any(category in self.config.refuse_categories for category in categories):
            plan = await self._refuse.plan(context)
            plan.details["reason"] = "category refused outright"
            return plan
        form = resolve_form(self.config, context.upstream)
        template = self._template_for(context) if form == "completions" else None
        if form is None or (form == "completions" and template is None):
            plan = await self._fallback.plan(context)
            plan.details["reason"] = "upstream cannot continue a partial turn"
            return plan
        trigger = choose_trigger(categories, context.round, self.config.triggers,
                                 self.config.category_triggers)
        reasoning, answer = context.released_reasoning, context.released_answer
        # Fast mode showed the flagged step; the model's context still drops it (IPO's cut).
        if context.flagged_released:
            if context.channel == "answer":
                answer = answer.removesuffix(context.flagged_released)
            else:
                reasoning = reasoning.removesuffix(context.flagged_released)
        # A trigger is reasoning, never answer text. A flag in the answer before any of it
        # reached the client goes back to the end of the reasoning (the last safe point): the
        # model reflects there and answers afresh. Once the client has part of the answer its
        # reasoning is over: the trigger goes into the model's reasoning unseen, and the answer
        # goes on from its last released step, so the client reads one answer, not a patchwork.
        continue_answer = context.channel == "answer" and bool(answer.strip())
        if continue_answer:
            prefix = AssistantPrefix(reasoning + _joined(reasoning, trigger), answer, True)
            inserted: list[TextDelta] = []
        else:
            prefix = AssistantPrefix(reasoning + _joined(reasoning, trigger))
            inserted = [TextDelta("reasoning", _joined(context.released_reasoning, trigger))]
        upstream = context.upstream
        assert isinstance(upstream, ContinuesTurns), "resolve_form found a form"
        continuation = upstream.continue_stream(
            context.request, prefix, form, categories=tuple(categories), template=template,
            url=self.config.continuation_url,
        )
        return CorrectionPlan(
            action="intervened",
            inserted=inserted,
            continuation=continuation,
            details={"form": form, "trigger": trigger,
                     "continues": "answer" if continue_answer else "reasoning",
                     "trigger_shown": "false" if continue_answer else "true"},
        )

    def _template_for(self, context: CorrectionContext) -> ChatTemplate | None:
        if self._template is not None:
            return self._template
        name = guess_template(context.upstream.config.model or context.request.model)
        return load_template(name) if name else None

    async def aclose(self) -> None:
        await self._fallback.aclose()
