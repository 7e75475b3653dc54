"""The guarded stream: checks every step while generation goes on and decides what the client
may see.

A producer task reads the upstream and splits its text into steps; each finished step is sent to
the guard at once (a few checks in flight per stream), so the guard's latency hides behind the
model's. The consumer, which is what the caller iterates, releases text in order:

- strict: a step is released only after it and every step before it were judged safe, so not
  one character of a flagged step reaches the client;
- fast: text is released as it arrives and judged behind it; a step's text waits only for the
  verdicts of the steps before it, so at most the flagged step itself leaks.

On an unsafe verdict the upstream request is cancelled, unreleased text is withheld, and the
corrector decides what follows. A continuation it returns is guarded the same way, for at most
``correction.max_rounds`` rounds; then the answer is a refusal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from guardrail.cases.model import Case, Correction, Flag, StepRecord
from guardrail.config import Config
from guardrail.correctors.base import CorrectionContext, CorrectionPlan, Corrector
from guardrail.correctors.simple import RefuseCorrector
from guardrail.errors import GuardError, UpstreamError, UpstreamStreamBroken
from guardrail.events import Channel, Finish, ResponseMeta, TextDelta, UpstreamEvent, Usage
from guardrail.guards.base import Guard, GuardView, Verdict
from guardrail.metrics import Metrics
from guardrail.steps import StepSplitter
from guardrail.upstreams.base import ChatRequest, Upstream
from guardrail.views import build_view, request_text

logger = logging.getLogger(__name__)
_YIELD_EVERY = 16

_TOKEN = re.compile(r"\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token count (words and punctuation): close enough for wait tokens."""
    return len(_TOKEN.findall(text))

OutputEvent = TextDelta | Finish | Usage | ResponseMeta


@dataclass(slots=True)
class _Step:
    record: StepRecord
    check: asyncio.Task[Verdict] | None


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Fast mode: raw text to release at once."""

    delta: TextDelta


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


class _End:
    pass


_Item = _Step | _Chunk | _Failure | _End | Finish | Usage | ResponseMeta


class _Inbox:
    """What the producer hands the release loop, in order. An ``asyncio.Queue`` without its
    capacity machinery, and with ``peek``: whether the next event can be had at once."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[_Item] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: _Item) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> _Item:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def get_nowait(self) -> _Item:
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    def peek(self) -> _Item | None:
        return self._items[0] if self._items else None


@dataclass(slots=True)
class _Flagged:
    step: _Step
    verdict: Verdict


@dataclass(slots=True)
class _RoundState:
    splitters: dict[Channel, StepSplitter]
    queue: _Inbox = field(default_factory=_Inbox)
    steps: list[_Step] = field(default_factory=list)
    judged_behind: list[_Step] = field(default_factory=list)
    """Fast mode: steps released before their verdict, oldest first."""
    number: int = 0
    flagged: _Flagged | None = None
    finish_reason: str | None = None
    withheld: str = ""
    released_chars: int = 0
    failure: BaseException | None = None
    """A continuation that failed before showing anything (the response falls back)."""

    def text(self) -> str:
        """Everything the model wrote in this round."""
        pending = "".join(splitter.pending for splitter in self.splitters.values())
        return "".join(step.record.text for step in self.steps) + pending


class GuardedStream:
    """One guarded response. Iterate ``events()`` once; the ``case`` fills in as it goes and is
    complete when the iteration ends, however it ends."""

    def __init__(
        self,
        *,
        request: ChatRequest,
        upstream: Upstream,
        guard: Guard,
        corrector: Corrector,
        config: Config,
        metrics: Metrics,
        case: Case,
    ) -> None:
        self.request = request
        self.upstream = upstream
        self.guard = guard
        self.corrector = corrector
        self.config = config
        self.metrics = metrics
        self.case = case
        self._checking = guard.name != "none"
        self._strict = config.stream.mode == "strict" and self._checking
        self._request_text = request_text(request.messages, config.guard.max_request_chars)
        self._history: list[str] = []  # released steps, and steps in flight, in order
        self._semaphore = asyncio.Semaphore(config.guard.max_concurrency)
        self._started = time.perf_counter()
        self._first_token_at: float | None = None
        self._meta_sent = False
        self._round: _RoundState | None = None
        self._released: dict[Channel, list[str]] = {"reasoning": [], "answer": []}
        case.mode = config.stream.mode if self._checking else "passthrough"
        case.guard = guard.name

    async def events(self) -> AsyncIterator[OutputEvent]:
        source: AsyncIterator[UpstreamEvent] = self.upstream.stream(self.request)
        round_number = 0
        correction: Correction | None = None  # the correction whose continuation is running
        flagged_at: float | None = None
        try:
            while True:
                state = self._new_round(round_number)
                # aclosing: if this generator is closed early (the client left), the round's
                # clean-up (cancel the upstream and the checks) must run now, not at GC.
                async with contextlib.aclosing(self._run_round(source, state, round_number)) as (
                    round_events
                ):
                    async for event in round_events:
                        if flagged_at is not None and isinstance(event, TextDelta):
                            waited = time.perf_counter() - flagged_at
                            self.metrics.intervention_latency.observe(waited)
                            flagged_at = None
                        yield event
                if correction is not None:
                    self._close_correction(correction, state)
                if state.flagged is None and state.failure is None:
                    self.case.finish_reason = state.finish_reason
                    yield Finish(state.finish_reason)
                    return
                flagged_at = time.perf_counter()
                plan, correction = await self._plan_correction(state, round_number + 1)
                for delta in plan.inserted:
                    self._note_released(delta)
                    self._history.append(delta.text)
                    yield delta
                if plan.continuation is None:
                    self.case.finish_reason = plan.finish_reason
                    self._count_corrections()
                    yield Finish(plan.finish_reason)
                    return
                source = plan.continuation
                round_number += 1
        finally:
            self._sync_released()
            self.case.timings.total_ms = (time.perf_counter() - self._started) * 1000

    def output_ready(self) -> bool:
        """Whether the next event of ``events()`` can be had without waiting: the next item is
        in, and releasing it waits for no verdict (nor for a correction after an unsafe one).
        A writer may then hold what it has and send both at once: one write, not one per event;
        when this is False it must send what it holds, or text could wait behind a verdict."""
        state = self._round
        item = state.queue.peek() if state is not None else None
        if item is None or state is None:
            return False
        # Only items whose handling yields an event at once: a fast-mode step, a repeated
        # ResponseMeta or a Finish yield nothing and the loop goes on to wait for the next one.
        if isinstance(item, _Step):
            return self._strict and self._judged_safe(item)
        if isinstance(item, _Chunk | _End):
            return all(self._judged_safe(step) for step in state.judged_behind)
        if isinstance(item, ResponseMeta):
            return not self._meta_sent
        return isinstance(item, Usage)

    @staticmethod
    def _judged_safe(step: _Step) -> bool:
        check = step.check
        if check is None:
            return True
        return check.done() and not check.cancelled() and check.exception() is None and \
            not check.result().unsafe

    # -- one round: the upstream's text, guarded -------------------------------------------

    def _new_round(self, number: int) -> _RoundState:
        stream = self.config.stream
        splitters: dict[Channel, StepSplitter] = {
            channel: StepSplitter(stream.split, stream.max_step_chars, stream.min_step_chars)
            for channel in ("reasoning", "answer")
        }
        return _RoundState(splitters=splitters, number=number)

    async def _run_round(
        self, source: AsyncIterator[UpstreamEvent], state: _RoundState, round_number: int
    ) -> AsyncGenerator[OutputEvent, None]:
        producer = asyncio.create_task(self._produce(source, state, round_number))
        self._round = state
        judged_behind = state.judged_behind
        try:
            while True:
                item = await state.queue.get()
                if isinstance(item, _Step):
                    if self._strict:
                        verdict = await self._verdict_of(item)
                        if verdict.unsafe:
                            state.flagged = _Flagged(item, verdict)
                            return
                        item.record.released = True
                        delta = TextDelta(item.record.channel, item.record.text)
                        self._note_released(delta)
                        state.released_chars += len(delta.text)
                        yield delta
                    else:
                        item.record.released = True  # its chunks went out before it
                        judged_behind.append(item)
                        state.flagged = self._first_unsafe_done(judged_behind)
                        if state.flagged is not None:
                            return
                elif isinstance(item, _Chunk):
                    # The next step's text waits for the verdicts before it: at most one step
                    # (the flagged one) can leak.
                    state.flagged = await self._first_unsafe(judged_behind)
                    if state.flagged is not None:
                        return
                    self._note_released(item.delta)
                    state.released_chars += len(item.delta.text)
                    yield item.delta
                elif isinstance(item, ResponseMeta):
                    if not self._meta_sent:
                        self._meta_sent = True
                        yield item
                elif isinstance(item, Usage):
                    self.case.usage = item.data
                    yield item
                elif isinstance(item, Finish):
                    state.finish_reason = item.reason
                else:  # _End or _Failure: every verdict still out decides first
                    state.flagged = await self._first_unsafe(judged_behind)
                    if state.flagged is None and isinstance(item, _Failure):
                        if round_number > 0 and state.released_chars == 0:
                            # A continuation that failed before showing anything: the response
                            # falls back to a refusal rather than ending in an error.
                            state.failure = item.error
                            return
                        raise item.error
                    return
        finally:
            self._round = None
            self._stop_round(producer, state)

    async def _produce(
        self, source: AsyncIterator[UpstreamEvent], state: _RoundState, round_number: int
    ) -> None:
        current: Channel | None = None
        handled = 0
        try:
            async for event in source:
                handled += 1
                if handled % _YIELD_EVERY == 0:
                    # A burst already in the socket buffer is read without ever suspending;
                    # let the rest of the loop (other streams, this one's sender) run meanwhile.
                    await asyncio.sleep(0)
                if isinstance(event, TextDelta):
                    if self._first_token_at is None:
                        self._first_token_at = time.perf_counter()
                        elapsed = self._first_token_at - self._started
                        self.case.timings.upstream_first_token_ms = elapsed * 1000
                        self.metrics.upstream_first_token.observe(elapsed)
                    if current is not None and current != event.channel:
                        # The other channel's last sentence is complete once this one starts.
                        finished = state.splitters[current].finish()
                        self._emit_steps(state, current, finished, round_number)
                    current = event.channel
                    if not self._strict:
                        state.queue.put_nowait(_Chunk(event))
                    steps = state.splitters[event.channel].feed(event.text)
                    self._emit_steps(state, event.channel, steps, round_number)
                else:
                    state.queue.put_nowait(event)
            for channel in state.splitters:
                self._emit_steps(state, channel, state.splitters[channel].finish(), round_number)
            state.queue.put_nowait(_End())
        except UpstreamError as error:
            state.queue.put_nowait(_Failure(error))
        except Exception as error:  # a bug in a backend must still end the stream cleanly
            logger.exception("upstream %s failed", self.upstream.name)
            state.queue.put_nowait(_Failure(UpstreamStreamBroken(f"upstream failed: {error}")))
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                # Closing the upstream generator closes its HTTP request: generation stops.
                # Shielded, so that a second cancellation cannot leave the request open.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(aclose())

    def _emit_steps(
        self, state: _RoundState, channel: Channel, texts: list[str], round_number: int
    ) -> None:
        for text in texts:
            record = StepRecord(index=len(self.case.steps), channel=channel, text=text,
                                round=round_number, released=not self._checking)
            self.case.steps.append(record)
            check: asyncio.Task[Verdict] | None = None
            if self._checking:
                view = build_view(self._request_text, self._history, text, channel,
                                  self.config.guard.window_steps, round_number)
                check = asyncio.create_task(self._check(view, record))
            self._history.append(text)
            step = _Step(record, check)
            state.steps.append(step)
            if self._checking:
                state.queue.put_nowait(step)

    def _stop_round(self, producer: asyncio.Task[None], state: _RoundState) -> None:
        """Cancel generation and pending checks; what the client did not see is withheld."""
        # Cancel without awaiting: this may run inside a cancelled scope (the client left), where
        # an await would be cancelled again and cut the upstream's clean-up short. The producer
        # closes the upstream itself; the splitters are final once it is cancelled.
        producer.cancel()
        for step in state.steps:
            if step.check is not None:
                step.check.cancel()
        if self._strict:
            unreleased = [step.record.text for step in state.steps if not step.record.released]
            unreleased += [splitter.pending for splitter in state.splitters.values()]
        else:
            unreleased = []
            while not state.queue.empty():
                item = state.queue.get_nowait()
                if isinstance(item, _Chunk):
                    unreleased.append(item.delta.text)
        state.withheld = "".join(unreleased)
        self.case.withheld += state.withheld
        if state.flagged is not None:
            # Later checks must not see text the client never saw as context.
            self._history = [step.text for step in self.case.steps if step.released]

    # -- guard checks --------------------------------------------------------------------

    async def _check(self, view: GuardView, record: StepRecord) -> Verdict:
        guard_name = self.guard.name
        async with self._semaphore:
            started = time.perf_counter()
            try:
                verdict = await asyncio.wait_for(
                    self.guard.check(view), timeout=self.config.guard.timeout_s
                )
            except TimeoutError:
                verdict = self._on_guard_error("timeout", f"guard timed out after "
                                               f"{self.config.guard.timeout_s:g}s")
            except GuardError as error:
                verdict = self._on_guard_error("error", str(error))
            except Exception as error:
                logger.exception("guard %s failed", guard_name)
                verdict = self._on_guard_error("error", f"{type(error).__name__}: {error}")
            latency = time.perf_counter() - started
        self.metrics.checks.labels(guard_name, view.channel).inc()
        self.metrics.guard_latency.labels(guard_name).observe(latency)
        timings = self.case.timings
        timings.guard_total_ms += latency * 1000
        timings.guard_max_ms = max(timings.guard_max_ms, latency * 1000)
        record.unsafe = verdict.unsafe
        record.categories = list(verdict.categories)
        record.score = verdict.score
        record.raw = verdict.raw
        record.error = verdict.error
        record.latency_ms = latency * 1000
        if verdict.error is not None:
            self.metrics.verdicts.labels("error", "guard_error").inc()
        elif verdict.unsafe:
            for category in verdict.categories or ("unspecified",):
                self.metrics.verdicts.labels("unsafe", category).inc()
        else:
            self.metrics.verdicts.labels("safe", "").inc()
        return verdict

    def _on_guard_error(self, kind: str, message: str) -> Verdict:
        decision = self.config.guard.on_error
        self.metrics.guard_errors.labels(self.guard.name, kind, decision).inc()
        logger.warning("guard %s %s (%s): %s", self.guard.name, kind, decision, message)
        return Verdict(unsafe=decision == "block", categories=("guard_error",), error=message)

    async def _verdict_of(self, step: _Step) -> Verdict:
        assert step.check is not None
        return await step.check

    @staticmethod
    def _first_unsafe_done(steps: list[_Step]) -> _Flagged | None:
        """Fast mode: the first released step whose verdict is back and unsafe (in order)."""
        while steps and steps[0].check is not None and steps[0].check.done():
            step = steps.pop(0)
            verdict = step.check.result() if step.check is not None else None
            if verdict is not None and verdict.unsafe:
                return _Flagged(step, verdict)
        return None

    async def _first_unsafe(self, steps: list[_Step]) -> _Flagged | None:
        """Fast mode, at the end: wait for every verdict still out."""
        while steps:
            step = steps.pop(0)
            if (verdict := await self._verdict_of(step)).unsafe:
                return _Flagged(step, verdict)
        return None

    # -- after a flag ----------------------------------------------------------------------

    async def _plan_correction(
        self, state: _RoundState, round_number: int
    ) -> tuple[CorrectionPlan, Correction]:
        correction = Correction(round=round_number, strategy=self.corrector.name,
                                withheld=state.withheld)
        self.case.corrections.append(correction)
        self.metrics.wait_tokens.inc(estimate_tokens(state.withheld))
        if state.flagged is None:
            # Only a failed continuation gets here: end with the refusal.
            assert state.failure is not None
            correction.extra["error"] = f"{type(state.failure).__name__}: {state.failure}"
            self.metrics.errors.labels("continuation").inc()
            return await self._apply(RefuseCorrector(self.config.correction), state,
                                     round_number, correction)
        record, verdict = state.flagged.step.record, state.flagged.verdict
        self.case.flagged.append(
            Flag(step=record.index, categories=list(verdict.categories), score=verdict.score)
        )
        if verdict.error is not None:
            # The guard could not judge and on_error is block: end here, and say so.
            self.case.error = f"guard: {verdict.error}"
            self.case.action = "error"
            self.metrics.errors.labels("guard").inc()
            correction.strategy = "error"
            return CorrectionPlan(action="error", finish_reason="content_filter"), correction
        corrector = self.corrector
        if round_number > self.config.correction.max_rounds:
            corrector = RefuseCorrector(self.config.correction)
            correction.extra["reason"] = "max_rounds reached"
        return await self._apply(corrector, state, round_number, correction)

    async def _apply(
        self, corrector: Corrector, state: _RoundState, round_number: int,
        correction: Correction,
    ) -> tuple[CorrectionPlan, Correction]:
        flagged = state.flagged
        context = CorrectionContext(
            request=self.request,
            upstream=self.upstream,
            config=self.config.correction,
            released_reasoning="".join(self._released["reasoning"]),
            released_answer="".join(self._released["answer"]),
            withheld=state.withheld,
            verdict=flagged.verdict if flagged else Verdict(unsafe=True),
            round=round_number,
            channel=flagged.step.record.channel if flagged else "reasoning",
            flagged_released=(flagged.step.record.text
                              if flagged and flagged.step.record.released else ""),
        )
        plan = await corrector.plan(context)
        self.case.action = plan.action
        correction.strategy = corrector.name
        correction.inserted = "".join(delta.text for delta in plan.inserted)
        correction.extra.update(plan.details)
        if plan.continuation is not None:
            self.metrics.interventions.labels(corrector.name,
                                              plan.details.get("form", "")).inc()
        return plan, correction

    def _close_correction(self, correction: Correction, state: _RoundState) -> None:
        """A continuation round ended: keep what it wrote and whether it stayed safe."""
        correction.continuation = state.text()
        recovered = state.flagged is None and state.failure is None
        correction.extra["recovered"] = recovered
        outcome = "recovered" if recovered else "failed" if state.failure else "unsafe_again"
        self.metrics.recoveries.labels(outcome).inc()
        if recovered:
            self._count_corrections()

    def _count_corrections(self) -> None:
        if self.case.corrections:
            self.metrics.correction_rounds.observe(len(self.case.corrections))

    def _note_released(self, delta: TextDelta) -> None:
        self._released[delta.channel].append(delta.text)

    def _sync_released(self) -> None:
        """Copy what the client was sent into the case. Joined when needed rather than grown
        chunk by chunk: a long trace would cost quadratic copying (1.3 s at 64k chunks)."""
        self.case.client_reasoning = "".join(self._released["reasoning"])
        self.case.client_content = "".join(self._released["answer"])
