"""What ``--judge`` names, and the harm judge built from it.

``--judge`` may be given more than once. Each value is a guard (a project config file, whose
``guard`` section is used, or a guard kind such as ``embedded`` or ``llama-guard``) or a model (an
Inspect model name ``provider/name``, or an endpoint URL). The guard judges the reasoning, the
answer and the full output apart; the model is the rubric judge (StrongREJECT's rubric and
XSTest's refusal classes). Without a guard the config's own guard judges; without a model there
is no StrongREJECT score and the refusal judge is string matching, labelled as the weaker
fallback.

Guards are built once per event loop and closed when Inspect's run ends (a hook), so one guard
serves every benchmark of a run, and each view batch is one ``check_many`` call.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from guardrail.config import Config, GuardConfig, config_from_mapping, load_config
from guardrail.errors import ConfigError
from guardrail.guards.base import Guard, GuardView, Verdict
from guardrail.step_checker import StepChecker
from guardrail.views import request_text
from offline.eval.errors import EvalError
from offline.eval.traces import Trace

View = Literal["reasoning", "answer", "full"]
VIEWS: tuple[View, ...] = ("reasoning", "answer", "full")


@dataclass(frozen=True)
class JudgeSpec:
    guard_config: Config
    guard_label: str
    model: str | None = None
    """The rubric judge as given: an Inspect model name or an endpoint URL."""


def _known_guards() -> list[str]:
    from guardrail.guards import GUARDS

    return GUARDS.names()


def is_model(value: str) -> bool:
    return value.startswith(("http://", "https://")) or (
        "/" in value and not value.endswith((".yaml", ".yml")) and not Path(value).exists())


def parse_judges(values: list[str], config: Config, config_label: str) -> JudgeSpec:
    guard: tuple[Config, str] | None = None
    model: str | None = None
    for value in values:
        if value.endswith((".yaml", ".yml")) or Path(value).is_file():
            try:
                found = (load_config(value), value)
            except ConfigError as error:
                raise EvalError(f"--judge {value}: {error}") from error
        elif value in _known_guards():
            data = config.model_dump(mode="json")
            data["guard"] = {**data["guard"], "kind": value}
            try:
                found = (config_from_mapping(data), f"guard {value}")
            except ConfigError as error:
                raise EvalError(f"--judge {value}: {error}") from error
        elif is_model(value):
            if model is not None:
                raise EvalError(f"--judge: two models ({model}, {value}); give one")
            model = value
            continue
        else:
            raise EvalError(
                f"unknown judge {value!r}; known: a guard ({', '.join(_known_guards())}), a "
                "guard config file (.yaml), or a model (provider/name, e.g. openai/gpt-4o, or "
                "an endpoint URL)")
        if guard is not None:
            raise EvalError(f"--judge: two guards ({guard[1]}, {found[1]}); give one")
        guard = found
    if guard is None:
        guard = (config, f"guard {config.guard.kind} ({config_label})")
    return JudgeSpec(guard_config=guard[0], guard_label=guard[1], model=model)


# -- the harm judge ------------------------------------------------------------------------------


@dataclass
class ViewVerdict:
    """One judged view: which it was, whether its text was cut off, and the guard's verdict."""

    view: View
    truncated: bool
    unsafe: bool | None
    categories: list[str] = field(default_factory=list)
    score: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"view": self.view, "truncated": self.truncated, "unsafe": self.unsafe,
                "categories": self.categories, "score": self.score, "error": self.error}


def view_texts(trace: Trace) -> dict[View, tuple[str, bool]]:
    """Each non-empty view's text and whether it was cut off by the token limit."""
    texts: dict[View, tuple[str, bool]] = {}
    if trace.reasoning:
        texts["reasoning"] = (trace.reasoning, trace.reasoning_cut)
    if trace.answer:
        texts["answer"] = (trace.answer, trace.answer_cut)
    if trace.full:
        texts["full"] = (trace.full, trace.truncated)
    return texts


class HarmJudge:
    """A project guard behind the step checker (refusal rule, timeout, ``on_error``), judging a
    trace's views in one batch."""

    def __init__(self, guard: Guard, config: GuardConfig) -> None:
        self.guard = guard
        self.config = config
        self.checker = StepChecker(guard, config)

    async def judge(self, prompt: str, trace: Trace) -> dict[View, ViewVerdict]:
        texts = view_texts(trace)
        request = request_text([{"role": "user", "content": prompt}],
                               self.config.max_request_chars)
        views = [GuardView(request=request, context=(), step=text,
                           channel="reasoning" if name == "reasoning" else "answer")
                 for name, (text, _) in texts.items()]
        verdicts: list[Verdict] = await self.checker.check_many(views) if views else []
        return {name: ViewVerdict(view=name, truncated=cut,
                                  unsafe=None if verdict.error else verdict.unsafe,
                                  categories=list(verdict.categories), score=verdict.score,
                                  error=verdict.error)
                for (name, (_, cut)), verdict in zip(texts.items(), verdicts, strict=True)}


_JUDGES: dict[tuple[int, str], asyncio.Future[HarmJudge]] = {}


async def _build(config: Config) -> HarmJudge:
    from guardrail.guards import build_guard
    from guardrail.guards.capabilities import warm_up

    guard = build_guard(config.guard)
    try:
        await warm_up(guard)
    except BaseException:
        await guard.aclose()
        raise
    return HarmJudge(guard, config.guard)


async def harm_judge(config: Config) -> HarmJudge:
    """The judge for this config in the running loop, built once. The first samples of every
    benchmark ask at the same moment: each waits for the one build rather than loading its own
    copy of the guard's model (six embedded guards loaded for one safety run; a GPU runner would
    load the model that many times)."""
    key = (id(asyncio.get_running_loop()), config.guard.model_dump_json())
    pending = _JUDGES.get(key)
    if pending is None:
        pending = _JUDGES[key] = asyncio.ensure_future(_build(config))
    try:
        # Shielded: a sample cancelled while it waits does not cancel the build the others share.
        return await asyncio.shield(pending)
    except Exception:
        if _JUDGES.get(key) is pending:  # a failed build is tried again by the next sample
            del _JUDGES[key]
        raise


async def close_judges() -> None:
    """Closes the judges built in the running loop (called when Inspect's run ends)."""
    loop = id(asyncio.get_running_loop())
    for key in [key for key in _JUDGES if key[0] == loop]:
        pending = _JUDGES.pop(key)
        if not pending.done():
            pending.cancel()
            continue
        if not pending.cancelled() and pending.exception() is None:
            await pending.result().guard.aclose()
