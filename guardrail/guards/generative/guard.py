"""A generative guard: one family (its prompt and answer) run by one runner, behind the Guard
protocol, and ``create_generative``, the one factory for every family and runner.

The family is ``guard.kind`` (``llama-guard``, ``qwen3guard``, ``wildguard``, ``granite-guardian``,
``shieldgemma``); with ``kind: vllm`` (the older spelling) it is ``guard.options.format``, Llama
Guard by default. The runner is ``guard.runner``: ``auto`` (the default) runs the model behind
``guard.url`` when one is set (``endpoint``) and in-process with transformers otherwise
(``transformers``); ``vllm`` runs it in-process on vLLM, which ``kind: vllm`` implies.

Deciding is the same for all: with a score, a step is unsafe iff ``score >= guard.threshold`` (the
text is the greedy reading at 0.5; the threshold is the user's knob); without one, the text
decides and the score is recorded as 1.0 / 0.0. The model's answer is kept as ``Verdict.raw``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.base import GuardView, Verdict, check_each, decided_verdict
from guardrail.guards.generative.families import FAMILIES, Exchange, Family, Reading
from guardrail.guards.generative.families.base import check_options
from guardrail.guards.generative.runners import RUNNERS, Runner
from guardrail.guards.generative.runners.text import TextRunner
from guardrail.guards.generative.runners.transformers import HFRunner
from guardrail.guards.plumbing import queue_wait
from guardrail.guards.plumbing.load import GuardBacklog, LoadMeter
from guardrail.guards.plumbing.queue_wait import QueueWaitExceeded

VLLM_KIND = "vllm"
"""The older ``guard.kind`` for a family on the vllm runner (``options.format`` names it)."""


def decide(reading: Reading, threshold: float, latency_s: float, model: str) -> Verdict:
    """The verdict of a reading: its score against the threshold, or its text without one."""
    extra = {"model": model, **reading.extra}
    if reading.score is None:
        unsafe = reading.text_unsafe
        score = 1.0 if unsafe else 0.0
        extra["score_source"] = "verdict"
    else:
        score = min(1.0, max(0.0, reading.score))
        unsafe = score >= threshold
        extra["score_source"] = reading.score_source
    return decided_verdict(unsafe=unsafe, text_unsafe=reading.text_unsafe,
                           categories=reading.categories, score=score, raw=reading.raw,
                           latency_s=latency_s, extra=extra)


class GenerativeGuard:
    """``family`` judged by the model that ``runner`` runs.

    ``markers`` starts as the family's list and, once the model is loaded, gains the control
    tokens of its tokenizer (where the tokenizer is here): judged text cannot produce any control
    token the model knows.
    """

    def __init__(self, config: GuardConfig, family: Family, runner: Runner) -> None:
        self.config = config
        self.name = config.kind
        self.family = family
        self.runner = runner
        self.model = runner.model
        self.markers = family.markers
        self._ready = False
        self._warming: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._meter = LoadMeter()

    def backlog(self) -> GuardBacklog:
        """Checks sent to the model (in-process or at the endpoint) and not yet answered."""
        return self._meter.backlog()

    def warm_up(self) -> None:
        """Load the model now (blocking). Called in a thread at start-up, so that a model that
        cannot load is reported then and the first step does not wait for the load."""
        self.runner.load()
        tokens = self.runner.special_tokens()
        self.markers = self.family.markers.with_tokens(tokens) if tokens else self.family.markers
        self._ready = True

    def exchange(self, view: GuardView) -> Exchange:
        """What the family judges for ``view``: its texts, neutralised."""
        return Exchange.of(view, self.markers)

    async def _read(self, view: GuardView) -> Reading:
        exchange = self.exchange(view)
        threshold = self.config.threshold
        if isinstance(self.runner, HFRunner):
            return await self.family.read_local(self.runner, exchange, threshold)
        if not isinstance(self.runner, TextRunner):
            raise TypeError(f"{type(self.runner).__name__} is neither in-process nor a text runner")
        # Every request (one per ShieldGemma policy) finishes before an error is raised.
        completions = await check_each(self.runner.complete, self.family.requests(exchange))
        return self.family.read_text(exchange, completions, threshold)

    async def _prepare(self) -> None:
        """Warm up before the first check; concurrent first checks wait for the same warm-up and
        go on in the order they came. Loading does not count against the per-check limit."""
        # Always through the lock (free, it is taken at once): ``_ready`` turns true in the
        # worker thread, before the first check resumes, and a later check must not overtake it.
        # One lock per event loop, as an asyncio.Lock belongs to the loop it first waited in.
        loop = asyncio.get_running_loop()
        if self._warming is None or self._warming[0] is not loop:
            self._warming = (loop, asyncio.Lock())
        async with self._warming[1]:
            if not self._ready:
                await asyncio.to_thread(self.warm_up)

    async def check(self, view: GuardView) -> Verdict:
        started = time.perf_counter()
        try:
            await self._prepare()
            # Its own deadline (a cascade calls its stages directly), queue-aware like the step
            # checker's and nested in it: a check waiting in the runner's queue (a micro-batch,
            # a pooled connection) is not timed out by the checks ahead of it.
            async with queue_wait.deadline(self.config.timeout_s, self.config.max_queue_wait_s,
                                           guard=self.name):
                with self._meter.track():
                    reading = await self._read(view)
        except GuardError:
            raise
        except QueueWaitExceeded as error:
            raise GuardError(str(error)) from None
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
        return decide(reading, threshold=self.config.threshold,
                      latency_s=time.perf_counter() - started, model=self.model)

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        """All at once (they share micro-batches in-process and on vLLM, and a server batches
        concurrent requests); every check finishes before an error is raised."""
        return await check_each(self.check, views)

    async def aclose(self) -> None:
        await self.runner.aclose()
        self._ready = False


def family_name(config: GuardConfig) -> str:
    if config.kind != VLLM_KIND:
        return config.kind
    chosen = config.options.get("format", "llama-guard")
    if chosen not in FAMILIES.names():
        raise ConfigError(f"guard.options.format: expected one of {', '.join(FAMILIES.names())}")
    return str(chosen)


def runner_name(config: GuardConfig) -> str:
    if config.kind == VLLM_KIND:
        if config.runner not in ("auto", VLLM_KIND):
            raise ConfigError("guard.runner: kind vllm runs on the vllm runner; for another "
                              "runner set guard.kind to the family")
        return VLLM_KIND
    if config.runner == "auto":
        return "endpoint" if config.url else "transformers"
    return config.runner


def create_generative(config: GuardConfig, *, runner: Runner | None = None) -> GenerativeGuard:
    """The guard for ``config``'s family on its runner (``runner`` replaces the one the config
    names: for tests, or an application that holds an engine already)."""
    family = FAMILIES.create(family_name(config), config.options)
    chosen = runner_name(config)
    if runner is None:
        runner = RUNNERS.create(chosen, config,
                                model=config.model or family.default_model, guard=config.kind)
    allowed = (*family.options, *runner.option_keys,
               *(("format",) if config.kind == VLLM_KIND else ()))
    check_options(config.options, allowed, config.kind)
    return GenerativeGuard(config, family, runner)
