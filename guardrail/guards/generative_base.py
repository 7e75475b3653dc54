"""What the generative guards share: turning a model's reading into a Verdict, and the Guard
protocol's plumbing (errors, time limit, ``check_many``).

A backend implements ``_read(view) -> Reading``: the verdict the model's own words give, and a
probability-like score where one can be had (next-token probabilities in-process, logprobs from an
endpoint). Deciding is the same for all: with a score, a step is unsafe iff
``score >= guard.threshold`` (the text is the greedy reading at 0.5; the threshold is the user's
knob); without one, the text decides and the score is recorded as 1.0 / 0.0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.base import GuardView, Verdict, check_each
from guardrail.guards.chat_endpoint import GuardEndpoint
from guardrail.guards.hf_runner import RUNNER_OPTIONS, HFRunner, RunnerSettings
from guardrail.guards.neutralise import Markers, neutralise


@dataclass(frozen=True)
class Reading:
    text_unsafe: bool
    """The verdict in the model's words (its greedy answer)."""
    score: float | None
    """P(unsafe) in [0, 1] where the backend can compute it, else None."""
    categories: tuple[str, ...] = ()
    raw: str | None = None
    score_source: str = "verdict"
    """``logits`` (in-process), ``logprobs`` (endpoint) or ``verdict`` (text only)."""
    extra: Mapping[str, str] = field(default_factory=dict)


def decide(reading: Reading, threshold: float, latency_s: float, model: str) -> Verdict:
    extra = {"model": model, **reading.extra}
    if reading.score is None:
        unsafe = reading.text_unsafe
        score = 1.0 if unsafe else 0.0
        extra["score_source"] = "verdict"
    else:
        score = min(1.0, max(0.0, reading.score))
        unsafe = score >= threshold
        extra["score_source"] = reading.score_source
    if unsafe != reading.text_unsafe:
        # Kept so the audit log shows where the threshold overrode the model's own words.
        extra["text_verdict"] = "unsafe" if reading.text_unsafe else "safe"
    if reading.categories and not unsafe:
        extra["text_categories"] = ",".join(reading.categories)
    return Verdict(
        unsafe=unsafe,
        categories=reading.categories if unsafe else (),
        score=score,
        raw=reading.raw,
        latency_s=latency_s,
        extra=extra,
    )


def is_prompt_check(view: GuardView) -> bool:
    """A view with no response text asks about the request itself (``guardrail check`` with a
    prompt only): the guards' prompt-classification form is used."""
    return not view.response_text().strip()


def chat_messages(view: GuardView, neutralise: Callable[[str], str]) -> list[dict[str, str]]:
    """``[user]`` for a prompt check, else ``[user, assistant]`` with the response window: the
    conversation the chat-template guards judge the last message of; texts neutralised."""
    messages = [{"role": "user", "content": neutralise(view.request)}]
    if not is_prompt_check(view):
        messages.append({"role": "assistant", "content": neutralise(view.response_text())})
    return messages


def check_options(options: Mapping[str, Any], allowed: Collection[str], guard: str) -> None:
    """A misspelt option is a mistake the user wants to hear about, not silently ignore."""
    for key in options:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(f"guard.options.{key}: not an option of {guard} (known: {known})")


def choice_option(
    options: Mapping[str, Any], key: str, choices: Sequence[str], default: str
) -> str:
    value = options.get(key, default)
    if value not in choices:
        raise ConfigError(f"guard.options.{key}: expected one of {', '.join(choices)}")
    return str(value)


class GenerativeGuard:
    """The Guard protocol around ``_read``; subclasses set ``name`` and ``model``."""

    name = "generative"
    model = ""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config

    async def _prepare(self) -> None:
        """Work that must not count against the per-check time limit (loading a model)."""

    async def _read(self, view: GuardView) -> Reading:
        raise NotImplementedError

    async def check(self, view: GuardView) -> Verdict:
        started = time.perf_counter()
        try:
            await self._prepare()
            async with asyncio.timeout(self.config.timeout_s):
                reading = await self._read(view)
        except GuardError:
            raise
        except ConfigError as error:
            # A model that cannot load fails every check: a GuardError lets guard.on_error decide,
            # where a ConfigError would escape the monitor. warm_up() reports it at start-up.
            raise GuardError(str(error)) from error
        except TimeoutError:
            raise GuardError(
                f"{self.name}: no answer within {self.config.timeout_s:g}s"
            ) from None
        except Exception as error:
            raise GuardError(f"{self.name} failed: {type(error).__name__}: {error}") from error
        return decide(reading, self.config.threshold, time.perf_counter() - started, self.model)

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        """All at once (they share micro-batches in-process, and the server batches concurrent
        requests); every check finishes before an error is raised."""
        return await check_each(self.check, views)

    async def aclose(self) -> None:
        """Nothing to release by default."""


class LocalGuard(GenerativeGuard):
    """A generative guard run in-process with transformers (``guard.model``: a folder or hub id).

    ``markers`` starts as the family's static list and, once the tokenizer is loaded, gains every
    added token of that tokenizer: judged text cannot produce any control token the model knows.
    """

    options: tuple[str, ...] = ()
    """``guard.options`` keys this backend reads besides the runner's."""

    def __init__(self, config: GuardConfig, *, default_model: str, markers: Markers) -> None:
        super().__init__(config)
        check_options(config.options, (*RUNNER_OPTIONS, *self.options), self.name)
        self.model = config.model or default_model
        self.runner = HFRunner(self.model, RunnerSettings.from_options(config.options),
                               guard=self.name)
        self._base_markers = markers
        self.markers = markers
        self._ready = False

    def warm_up(self) -> None:
        """Load the model now (blocking). Call it in a thread at start-up so that a model that
        cannot load is reported then, and the first step does not wait for the load."""
        self.runner.load()
        self.markers = self._base_markers.with_tokens(self.runner.special_tokens())
        self._ready = True

    async def _prepare(self) -> None:
        if not self._ready:
            await asyncio.to_thread(self.warm_up)

    def neutralise(self, text: str) -> str:
        return neutralise(text, self.markers)

    async def aclose(self) -> None:
        self.runner.close()
        self._ready = False


class EndpointGuard(GenerativeGuard):
    """A generative guard behind an OpenAI-compatible server at ``guard.url``."""

    options: tuple[str, ...] = ()

    def __init__(self, config: GuardConfig, *, default_model: str, markers: Markers) -> None:
        super().__init__(config)
        # The runner's options are accepted (and unused) so one config serves both variants.
        check_options(config.options, (*RUNNER_OPTIONS, *self.options), self.name)
        self.endpoint = GuardEndpoint(config, guard=self.name, default_model=default_model)
        self.model = self.endpoint.model
        self.markers = markers

    def neutralise(self, text: str) -> str:
        return neutralise(text, self.markers)

    async def aclose(self) -> None:
        await self.endpoint.aclose()
