"""``guard.kind: cascade``: a cheap guard judges every step; a model guard only the uncertain ones.

    guard:
      kind: cascade
      options:
        first: {kind: embedded}                                   # fast, on the proxy's CPU
        second: {kind: llama-guard, url: http://gpu-box:8000/v1}  # slower, stronger
        band: [0.2, 0.8]

The first guard's score decides where it is confident: below ``band[0]`` the step is safe, at or
above ``band[1]`` it is the first guard's verdict; in ``[low, high)`` (uncertain) the step is
escalated and the second guard's verdict is final. A first verdict without a score, or a first
guard that fails, also escalates: the cascade never decides on less than it would without it.
Each stage's own settings (``threshold``, ``timeout_s``, ``options``) are in its mapping; the
mappings are full guard sections (so a stage can be a cascade itself). The cascade's own
``guard.timeout_s`` bounds a whole check, so it should cover both stages.

``stats()`` counts checks and escalations, for metrics (``guardrail.guards.plumbing.stats``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.base import Guard, GuardView, Verdict
from guardrail.guards.capabilities import WarmsUp
from guardrail.guards.plumbing.load import GuardBacklog, LoadMeter

DEFAULT_BAND = (0.2, 0.8)


class CascadeOptions(BaseModel):
    """``guard.options`` of the cascade guard."""

    model_config = ConfigDict(extra="forbid")

    first: dict[str, Any] = Field(default_factory=lambda: {"kind": "embedded"})
    second: dict[str, Any]
    band: tuple[float, float] = DEFAULT_BAND

    @model_validator(mode="after")
    def _ordered_band(self) -> CascadeOptions:
        low, high = self.band
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"band must be [low, high] with 0 <= low <= high <= 1, got "
                             f"[{low:g}, {high:g}]")
        return self


def _field(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc)


def parse_options(options: dict[str, Any]) -> tuple[CascadeOptions, GuardConfig, GuardConfig]:
    """The options and both stages' configs; errors name ``guard.options.<key>``."""
    try:
        parsed = CascadeOptions.model_validate(options)
    except ValidationError as error:
        first = error.errors()[0]
        where = _field(first["loc"])
        where = f".{where}" if where else " (band)"
        raise ConfigError(f"guard.options{where}: {first['msg']}") from None
    stages: list[GuardConfig] = []
    for stage in ("first", "second"):
        try:
            stages.append(GuardConfig.model_validate(getattr(parsed, stage)))
        except ValidationError as error:
            first = error.errors()[0]
            raise ConfigError(
                f"guard.options.{stage}.{_field(first['loc'])}: {first['msg']}"
            ) from None
    return parsed, stages[0], stages[1]


def _build_stage(config: GuardConfig, stage: str) -> Guard:
    from guardrail.guards import create_guard

    if config.kind == "none":
        raise ConfigError(f"guard.options.{stage}.kind: 'none' judges nothing; a cascade needs "
                          f"two guards")
    try:
        return create_guard(config)
    except ConfigError as error:
        # Say which stage: "guard.url: ..." becomes "guard.options.second.url: ...".
        message = str(error)
        if message.startswith("guard."):
            message = f"guard.options.{stage}.{message.removeprefix('guard.')}"
        else:
            message = f"guard.options.{stage}: {message}"
        raise type(error)(message) from None


class CascadeGuard:
    name = "cascade"

    def __init__(self, config: GuardConfig) -> None:
        options, first, second = parse_options(config.options)
        self.config = config
        self.low, self.high = options.band
        self.first = _build_stage(first, "first")
        self.second = _build_stage(second, "second")
        self.total = 0
        self.escalated = 0
        self.first_errors = 0
        self._meter = LoadMeter()

    def backlog(self) -> GuardBacklog:
        """Checks in the cascade, in either stage: a check waits for both when it escalates."""
        return self._meter.backlog()

    def stats(self) -> dict[str, int]:
        """Counters since start: checks, escalations, and escalations because the first stage
        failed (included in ``escalated``)."""
        return {"checks": self.total, "escalated": self.escalated,
                "first_errors": self.first_errors}

    def warm_up(self) -> None:
        """Load both stages' models now (blocking), for stages that load lazily."""
        for stage in (self.first, self.second):
            if isinstance(stage, WarmsUp):
                stage.warm_up()

    def _needs_second(self, verdict: Verdict) -> bool:
        score = verdict.score
        return verdict.error is not None or score is None or self.low <= score < self.high

    async def check(self, view: GuardView) -> Verdict:
        return (await self.check_many([view]))[0]

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        with self._meter.track(len(views)):
            return await self._check_many(views)

    async def _check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        started = time.perf_counter()
        firsts = await self._first_verdicts(views)
        escalate = [index for index, verdict in enumerate(firsts)
                    if verdict is None or self._needs_second(verdict)]
        self.total += len(views)
        self.escalated += len(escalate)
        self.first_errors += sum(1 for verdict in firsts if verdict is None)
        seconds: list[Verdict] = []
        if escalate:
            seconds = list(await self.second.check_many([views[index] for index in escalate]))
        by_index = dict(zip(escalate, seconds, strict=True))
        elapsed = time.perf_counter() - started
        return [self._combine(firsts[index], by_index.get(index), elapsed)
                for index in range(len(views))]

    async def _first_verdicts(self, views: Sequence[GuardView]) -> list[Verdict | None]:
        """The first stage's verdicts; None where it failed (then the second decides)."""
        try:
            return list(await self.first.check_many(views))
        except (GuardError, TimeoutError):
            if len(views) == 1:
                return [None]
        # One failure in a batch should not escalate the whole batch: retry one by one.
        results = await asyncio.gather(*(self.first.check(view) for view in views),
                                       return_exceptions=True)
        verdicts: list[Verdict | None] = []
        for result in results:
            if isinstance(result, GuardError | TimeoutError):
                verdicts.append(None)
            elif isinstance(result, BaseException):
                raise result
            else:
                verdicts.append(result)
        return verdicts

    def _combine(self, first: Verdict | None, second: Verdict | None, elapsed: float) -> Verdict:
        if second is None:
            assert first is not None
            extra = {**first.extra, "cascade": "first", "first_guard": self.first.name}
            return Verdict(unsafe=first.unsafe, categories=first.categories, score=first.score,
                           raw=first.raw, error=first.error, latency_s=elapsed, extra=extra)
        extra = {**second.extra, "cascade": "second", "first_guard": self.first.name,
                 "second_guard": self.second.name}
        if first is None:
            extra["first_error"] = "true"
        else:
            extra["first_score"] = "none" if first.score is None else f"{first.score:.4f}"
            if first.raw is not None:  # the audit log keeps what both stages said
                extra["first_raw"] = first.raw
        return Verdict(unsafe=second.unsafe, categories=second.categories, score=second.score,
                       raw=second.raw, error=second.error, latency_s=elapsed, extra=extra)

    async def aclose(self) -> None:
        await asyncio.gather(self.first.aclose(), self.second.aclose())
