"""The guard protocol: judge one step of a response, seen through a bounded view."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from guardrail.events import Channel


@dataclass(frozen=True, slots=True)
class GuardView:
    """What a guard sees for one check: bounded, so cost grows linearly with the trace.

    ``request`` is the user's request (truncated), ``context`` the few steps just before this
    one, ``step`` the text being judged.
    """

    request: str
    context: Sequence[str]
    step: str
    channel: Channel = "reasoning"
    round: int = 0
    """0 for the model's first attempt, then the correction round the step belongs to."""

    def response_text(self) -> str:
        """The window of the response ending with the step under judgement."""
        return "".join([*self.context, self.step])


@dataclass(frozen=True, slots=True)
class Verdict:
    unsafe: bool
    categories: tuple[str, ...] = ()
    score: float | None = None
    """Probability-like confidence that the text is unsafe, where the backend gives one."""
    raw: str | None = None
    """The guard's own output, kept for the audit log."""
    error: str | None = None
    """Set when the guard failed and ``guard.on_error`` decided the verdict."""
    latency_s: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


SAFE = Verdict(unsafe=False)


def decided_verdict(*, unsafe: bool, text_unsafe: bool, categories: tuple[str, ...],
                    score: float | None, raw: str | None, latency_s: float,
                    extra: dict[str, str]) -> Verdict:
    """A verdict that a threshold (or a rule) decided where the model's own words may say
    otherwise: the audit log keeps those words (``text_verdict``, ``text_categories``), and
    categories belong to an unsafe verdict only."""
    if unsafe != text_unsafe:
        extra["text_verdict"] = "unsafe" if text_unsafe else "safe"
    if categories and not unsafe:
        extra["text_categories"] = ",".join(categories)
    return Verdict(unsafe=unsafe, categories=categories if unsafe else (), score=score, raw=raw,
                   latency_s=latency_s, extra=extra)

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


async def check_each(
    check: Callable[[_Item], Awaitable[_Result]], items: Sequence[_Item]
) -> list[_Result]:
    """Every view (or request) checked concurrently, in order. All checks finish before the first
    error is raised, so none is left running behind it."""
    results = await asyncio.gather(*(check(item) for item in items), return_exceptions=True)
    answers: list[_Result] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        answers.append(result)
    return answers


class Guard(Protocol):
    """A guard backend. ``check_many`` lets batching backends judge several steps at once."""

    name: str

    async def check(self, view: GuardView) -> Verdict: ...

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]: ...

    async def aclose(self) -> None: ...
