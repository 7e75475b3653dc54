"""``guard.kind: none``: every step passes, nothing is checked (the proxy becomes a relay)."""

from __future__ import annotations

from collections.abc import Sequence

from guardrail.config import GuardConfig
from guardrail.guards.base import SAFE, GuardView, Verdict


class PassThroughGuard:
    name = "none"

    def __init__(self, config: GuardConfig | None = None) -> None:
        del config

    async def check(self, view: GuardView) -> Verdict:
        return SAFE

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        return [SAFE for _ in views]

    async def aclose(self) -> None:
        return None
