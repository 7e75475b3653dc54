"""The two correctors that end the response: ``refuse`` and ``block``."""

from __future__ import annotations

from guardrail.config import CorrectionConfig
from guardrail.correctors.base import CorrectionContext, CorrectionPlan
from guardrail.events import TextDelta


class RefuseCorrector:
    """Replaces the rest of the response with the configured refusal, as a normal answer."""

    name = "refuse"

    def __init__(self, config: CorrectionConfig) -> None:
        self.message = config.refusal_message

    async def plan(self, context: CorrectionContext) -> CorrectionPlan:
        # Start on a fresh paragraph when an answer was already under way.
        separator = "\n\n" if context.released_answer.strip() else ""
        return CorrectionPlan(
            action="refused",
            inserted=[TextDelta("answer", separator + self.message)],
            finish_reason="stop",
        )

    async def aclose(self) -> None:
        return None


class BlockCorrector:
    """Ends the response where it stands, with finish_reason ``content_filter``."""

    name = "block"

    def __init__(self, config: CorrectionConfig) -> None:
        del config

    async def plan(self, context: CorrectionContext) -> CorrectionPlan:
        return CorrectionPlan(action="blocked", finish_reason="content_filter")

    async def aclose(self) -> None:
        return None
