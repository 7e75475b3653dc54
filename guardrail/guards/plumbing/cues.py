"""Compliance cues (IPO): the first sentence that commits to carrying out a harmful request.

After such a sentence the chance of a safe continuation collapses, so the trace should be cut
there, not later where the harmful specifics start. A step is a cue when its wording commits to
help (rules below: fast, no model) AND the request it answers is itself judged harmful by the
guard (once per request, cached; by the guard's ``judge_request`` where it has one). The wrapper
adds this to any guard: a cue is reported as an unsafe verdict with the category
``compliance_cue``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

from guardrail.guards.base import Guard, GuardView, Verdict
from guardrail.guards.capabilities import JudgesRequests, WarmsUp

# First-person commitments to produce the requested content, and answer openers that deliver it.
# A bare "Okay, I'll" or "Okay, let me" is not one: it opens refusals ("Okay, I'll have to
# decline") and most reasoning ("Okay, let me think"), so a commitment needs its verb. Safe plans
# read alike ("I should provide a refusal", "I'll outline the risks"): "provide" needs what is
# delivered, "outline" / "lay out" not the risks, reasons or alternatives, and "help them" not
# "help them understand / find support".
_COMMITMENT = re.compile(
    r"""(?ix)
    \b(?:i'll|i\ will|i'm\ going\ to|i\ am\ going\ to|let\ me|let's|i\ should)\s+
      (?:now\s+|just\s+|go\ ahead\ and\s+|then\s+|first\s+)*
      (?:help\ (?:them|you|him|her)\b
          (?!\ (?:understand|see|find|seek|get\ help|get\ support|stay\ safe|cope|reach))
        |explain\ how|describe\ how|walk\ (?:them|you)
        |(?:outline|lay\ out)\b(?!\ (?:the\ |some\ )?(?:main\ |key\ |potential\ |possible\ )?
          (?:risks|dangers|consequences|reasons|why|legal|ethical|alternatives|safe
            |best\ practices))
        |provide\ (?:them\ |you\ )?(?:with\ )?(?:the\ |a\ )?
          (?:full\ |complete\ |detailed\ |exact\ |specific\ |step-by-step\ )*
          (?:instructions|steps|procedure|recipe|method|details|guide|route|code|script|tutorial
            |walkthrough|synthesis|formula|ingredients|materials)
        |give\ (?:them|you)\ (?:the|a|step|detailed)
        |write\ out\ (?:the|a)|list\ the\ (?:steps|materials|ingredients|chemicals)
        |go\ through\ the\ (?:steps|process|procedure))
    |\b(?:okay|ok|sure|alright|fine),?\s+here(?:'s|\ is|\ are)\b(?!\s+(?:why|the\ thing))
    |\bhere(?:'s|\ is|\ are)\ (?:how|the\ steps|a\ step-by-step
        |the\ (?:full\ )?(?:procedure|recipe|instructions))
    """
)


def commits_to_help(step: str) -> bool:
    """The wording of ``step`` commits to producing what was asked (rules only)."""
    return _COMMITMENT.search(step.replace("\u2019", "'")) is not None


class ComplianceCueGuard:
    """Wraps a guard: its verdicts, plus compliance cues in answers to harmful requests."""

    def __init__(self, inner: Guard) -> None:
        self.inner = inner
        self.name = inner.name
        self._request_verdicts: dict[str, asyncio.Task[Verdict]] = {}

    async def check(self, view: GuardView) -> Verdict:
        verdict = await self.inner.check(view)
        # A cue is where a first attempt's reasoning turns; after a correction the model is
        # steered, and offers of safe help read like commitments, so only the guard judges.
        if (verdict.unsafe or view.round > 0 or view.channel != "reasoning"
                or not view.request.strip() or not commits_to_help(view.step)):
            return verdict
        request = await self._judge_request(view.request)
        if not request.unsafe:
            return verdict
        return Verdict(
            unsafe=True,
            categories=("compliance_cue", *request.categories),
            score=max(request.score or 1.0, verdict.score or 0.0),
            raw=f"compliance cue in answer to a harmful request; step: {verdict.raw}",
            latency_s=verdict.latency_s,
            extra={"cue": "true"},
        )

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        return list(await asyncio.gather(*(self.check(view) for view in views)))

    async def _judge_request(self, request: str) -> Verdict:
        # Judged once per request, shared by every step of the stream: by the inner guard's
        # request judge where it has one (the embedded guard's request head), otherwise by its
        # check of a view with the request and no response (a prompt check).
        task = self._request_verdicts.get(request)
        if task is None or (task.done() and task.cancelled()):
            if isinstance(self.inner, JudgesRequests):
                task = asyncio.ensure_future(self.inner.judge_request(request))
            else:
                # No response text: template guards (Llama Guard...) classify the prompt itself.
                view = GuardView(request=request, context=(), step="", channel="reasoning")
                task = asyncio.ensure_future(self.inner.check(view))
            if len(self._request_verdicts) > 1024:
                self._request_verdicts.clear()
            self._request_verdicts[request] = task
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def warm_up(self) -> None:
        if isinstance(self.inner, WarmsUp):
            self.inner.warm_up()
