"""The guarded stream: checks every step while generation goes on and decides what the client
may see.

A response is a sequence of rounds. The first round is the model's own attempt; each later one
is the continuation a corrector asked for after a flag. In a round, a producer task reads the
upstream and splits its text into steps; each finished step is sent to the guard at once (a few
checks in flight per stream), so the guard's latency hides behind the model's. The release loop,
which is what the caller iterates, lets text out in order:

- strict (``_release_strict``): a step is released only after it and every step before it were
  judged safe, so not one character of a flagged step reaches the client;
- fast (``_release_fast``): text is released as it arrives and judged behind it; a step's text
  waits only for the verdicts of the steps before it, so at most the flagged step itself leaks.

Text whose channel is not known yet (``HeldText``: an R1-style template opened the think block
in the prompt) is judged as it streams but held, in both modes, until ``HeldResolved`` says
where it belongs.

A round ends in one outcome: ``Completed`` (the model finished), ``Flagged`` (a step was judged
unsafe: the upstream is cancelled and unreleased text withheld) or ``Failed`` (the upstream
broke). After a flag, or a continuation that failed before it showed anything, the corrector
plans what follows; a continuation it returns is the next round, for at most
``correction.max_rounds`` rounds; then the answer is a refusal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from guardrail.cases.model import Case, Correction, Flag, StepRecord
from guardrail.config import Config
from guardrail.correctors.base import CorrectionContext, CorrectionPlan, Corrector
from guardrail.correctors.simple import RefuseCorrector
from guardrail.errors import GuardrailError, UpstreamError, UpstreamStreamBroken, internal_error
from guardrail.events import (
    Channel,
    Closable,
    Finish,
    HeldResolved,
    HeldText,
    ResponseMeta,
    TextDelta,
    ToolCallDelta,
    UpstreamEvent,
    Usage,
)
from guardrail.guards.base import Guard, GuardView, Verdict
from guardrail.metrics import Metrics
from guardrail.step_checker import StepChecker, record_verdict
from guardrail.steps import StepSplitter
from guardrail.tool_calls import ToolCallAccumulator
from guardrail.tracing import NO_SPAN, Attributes, Span
from guardrail.upstreams.base import ChatRequest, Upstream
from guardrail.views import build_view, request_text

logger = logging.getLogger(__name__)
_YIELD_EVERY = 16
_READ_AHEAD = 4
"""Steps a stream may have waiting for a verdict, per ``guard.max_concurrency``, before the
producer stops reading the upstream until some are judged."""

_TOKEN = re.compile(r"\w+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token count (words and punctuation): close enough for wait tokens."""
    return len(_TOKEN.findall(text))


OutputEvent = TextDelta | ToolCallDelta | Finish | Usage | ResponseMeta
Ending = Literal["finished", "failed"]


# -- what the producer hands the release loop ----------------------------------------------------


@dataclass(slots=True)
class _Step:
    record: StepRecord
    check: asyncio.Task[Verdict] | None
    held: bool = False
    """Held text: judged now, released once its channel is known."""


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Fast mode: raw text to release at once."""

    delta: TextDelta


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


class _End:
    pass


_Item = (_Step | _Chunk | _Failure | _End | HeldResolved | ToolCallDelta | Finish | Usage
         | ResponseMeta)


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


# -- how a round ends ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completed:
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Flagged:
    step: _Step
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Failed:
    error: BaseException


RoundOutcome = Completed | Flagged | Failed


@dataclass(slots=True)
class _Round:
    number: int
    splitters: dict[Channel, StepSplitter]
    held_splitter: StepSplitter
    inbox: _Inbox = field(default_factory=_Inbox)
    steps: list[_Step] = field(default_factory=list)
    judged_behind: list[_Step] = field(default_factory=list)
    """Fast mode: steps released before their verdict, oldest first."""
    held_safe: list[_Step] = field(default_factory=list)
    """Held steps judged safe, waiting for their channel."""
    held_tool_calls: list[ToolCallDelta] = field(default_factory=list)
    """Tool calls after held text: they go out after it, once its channel is known."""
    outcome: RoundOutcome | None = None
    producer: asyncio.Task[None] | None = None
    finish_reason: str | None = None
    withheld: str = ""
    released_chars: int = 0
    judged_up_to: int = 0
    """Steps before this one all have their verdict (where the producer's count starts)."""

    def text(self) -> str:
        """Everything the model wrote in this round."""
        pending = "".join(splitter.pending for splitter in self.splitters.values())
        return ("".join(step.record.text for step in self.steps) + pending
                + self.held_splitter.pending)


class GuardedStream:
    """One guarded response. Iterate ``events()`` once; the ``case`` fills in as it goes and is
    complete when the iteration ends, however it ends. ``ended`` says how: ``finished`` (the
    last event was a ``Finish``), ``failed`` (an exception left ``events()``), or None (the
    iteration was closed before the end: the client left).

    ``span`` is the request's trace span: each round's upstream call, each guard check and each
    correction get a child span (``guardrail.tracing``; ``NO_SPAN`` when traces are off)."""

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
        on_checking: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
        span: Span = NO_SPAN,
    ) -> None:
        """``on_checking`` is called once: when the first check is sent to the guard, or when
        the stream ends without one; ``on_end`` once, when the stream ends, however it ends (an
        admission controller counts the stream as load to come until the first, and as a
        stream sending checks until the second)."""
        self.request = request
        self.upstream = upstream
        self.guard = guard
        self.corrector = corrector
        self.config = config
        self.metrics = metrics
        self.case = case
        self.ended: Ending | None = None
        self._checker = StepChecker(guard, config.guard, metrics)
        self._checking = guard.name != "none"
        self._strict = config.stream.mode == "strict" and self._checking
        self._request_text = request_text(request.messages, config.guard.max_request_chars)
        self._history: list[str] = []  # released steps, and steps in flight, in order
        self._semaphore = asyncio.Semaphore(config.guard.max_concurrency)
        self._read_ahead = _READ_AHEAD * config.guard.max_concurrency
        self._started = time.perf_counter()
        self._first_token_at: float | None = None
        self._meta_sent = False
        self._round: _Round | None = None
        self._released: dict[Channel, list[str]] = {"reasoning": [], "answer": []}
        self._tool_calls = ToolCallAccumulator()  # the tool calls the client was sent
        self._aborted: GuardrailError | None = None
        self._on_checking = on_checking
        self._on_end = on_end
        self.span = span
        self._round_span = span  # the parent of a round's spans: the request, or its correction
        self._correction_span: Span | None = None
        case.mode = config.stream.mode if self._checking else "passthrough"
        case.guard = guard.name

    async def events(self) -> AsyncGenerator[OutputEvent, None]:
        source: AsyncIterator[UpstreamEvent] = self.upstream.stream(self.request)
        number = 0
        correction: Correction | None = None  # the correction whose continuation is running
        flagged_at: float | None = None
        try:
            while True:
                if self._aborted is not None:
                    if isinstance(source, Closable):  # a continuation planned before the abort
                        with contextlib.suppress(Exception):
                            await source.aclose()
                    raise self._aborted
                round_ = self._new_round(number)
                # aclosing: if this generator is closed early (the client left), the round's
                # clean-up (cancel the upstream and the checks) must run now, not at GC.
                async with contextlib.aclosing(self._run_round(source, round_)) as released:
                    async for event in released:
                        if flagged_at is not None and isinstance(event, TextDelta):
                            self.metrics.intervention_latency.observe(
                                time.perf_counter() - flagged_at)
                            flagged_at = None
                        yield event
                outcome = round_.outcome
                assert outcome is not None, "a round that returned has an outcome"
                if correction is not None:
                    self._close_correction(correction, round_, outcome)
                if isinstance(outcome, Completed):
                    yield self._finish(outcome.finish_reason)
                    return
                if isinstance(outcome, Failed) and (number == 0 or round_.released_chars
                                                    or self._aborted is not None):
                    # The model's own attempt broke, or a continuation broke after it showed
                    # text: the response ends in that error.
                    raise outcome.error
                flagged_at = time.perf_counter()
                plan, correction = await self._plan_correction(round_, outcome)
                for delta in plan.inserted:
                    self._note_released(delta)
                    self._history.append(delta.text)
                    yield delta
                if plan.continuation is None:
                    self._end_correction_span("ended")
                    self._count_corrections()
                    yield self._finish(plan.finish_reason)
                    return
                source = plan.continuation
                number += 1
        except GuardrailError:
            self.ended = "failed"
            raise
        except Exception as error:  # a corrector's or a guard wrapper's bug: still ours to name
            self.ended = "failed"
            raise internal_error(error) from error
        finally:
            if self._correction_span is not None:  # the client left, or a failure
                self._correction_span.end()
            self._checking_started()  # ended without a check: no load to come either
            if self._on_end is not None:
                callback, self._on_end = self._on_end, None
                callback()
            self._sync_released()
            self.case.timings.total_ms = (time.perf_counter() - self._started) * 1000

    def abort(self, error: GuardrailError) -> None:
        """End the response early with ``error`` (a shutdown's drain deadline): the upstream is
        cancelled now, steps already sent to the guard are still released if judged safe, then
        ``events()`` raises ``error``; no correction starts after it."""
        if self._aborted is not None or self.ended is not None:
            return
        self._aborted = error
        round_ = self._round
        if round_ is not None and round_.producer is not None and not round_.producer.done():
            # Cancelled, the producer adds nothing more to the inbox (it closes the upstream
            # itself), so the failure queued here is the round's last item.
            round_.producer.cancel()
            round_.inbox.put_nowait(_Failure(error))

    def _finish(self, reason: str | None) -> Finish:
        self.case.finish_reason = reason
        self.ended = "finished"
        return Finish(reason)

    def output_ready(self) -> bool:
        """Whether the next event of ``events()`` can be had without waiting: the next item is
        in, and releasing it waits for no verdict (nor for a correction after an unsafe one).
        A writer may then hold what it has and send both at once: one write, not one per event;
        when this is False it must send what it holds, or text could wait behind a verdict."""
        round_ = self._round
        item = round_.inbox.peek() if round_ is not None else None
        if item is None or round_ is None:
            return False
        # Only items whose handling yields an event at once: a fast-mode step, a repeated
        # ResponseMeta or a Finish yield nothing and the loop goes on to wait for the next one.
        if isinstance(item, _Step):
            return (self._strict and not item.held) and _judged_safe(item)
        if isinstance(item, _Chunk | _End):
            return all(_judged_safe(step) for step in round_.judged_behind)
        if isinstance(item, ResponseMeta):
            return not self._meta_sent
        if isinstance(item, ToolCallDelta):
            return (not round_.held_safe and not round_.held_tool_calls
                    and all(_judged_safe(step) for step in round_.judged_behind))
        return isinstance(item, Usage)

    # -- one round: the upstream's text, guarded ---------------------------------------------

    def _new_round(self, number: int) -> _Round:
        stream = self.config.stream

        def splitter() -> StepSplitter:
            return StepSplitter(stream.split, stream.max_step_chars, stream.min_step_chars)

        return _Round(number=number,
                      splitters={"reasoning": splitter(), "answer": splitter()},
                      held_splitter=splitter())

    async def _run_round(
        self, source: AsyncIterator[UpstreamEvent], round_: _Round
    ) -> AsyncGenerator[OutputEvent, None]:
        """Releases the round's text until its outcome is known."""
        producer = asyncio.create_task(self._produce(source, round_))
        round_.producer = producer
        self._round = round_
        release = self._release_strict if self._strict else self._release_fast
        try:
            while round_.outcome is None:
                item = await round_.inbox.get()
                if isinstance(item, _Step | _Chunk):
                    delta = await release(item, round_)
                    if delta is not None:
                        yield delta
                elif isinstance(item, HeldResolved):
                    delta = self._resolve_held(item.channel, round_)
                    if delta is not None:
                        yield delta
                    for call in self._release_held_tool_calls(round_):
                        yield call
                elif isinstance(item, ToolCallDelta):
                    released = await self._release_tool_call(item, round_)
                    if released is not None:
                        yield released
                elif isinstance(item, ResponseMeta):
                    if not self._meta_sent:
                        self._meta_sent = True
                        yield item
                elif isinstance(item, Usage):
                    self.case.usage = item.data
                    yield item
                elif isinstance(item, Finish):
                    round_.finish_reason = item.reason
                else:
                    # The upstream ended or failed: every verdict still out decides first.
                    round_.outcome = await self._first_unsafe(round_.judged_behind) or (
                        Failed(item.error) if isinstance(item, _Failure)
                        else Completed(round_.finish_reason))
                    if isinstance(round_.outcome, Completed) and round_.held_safe:
                        # Held text nobody resolved: with nothing to say otherwise, an answer.
                        delta = self._resolve_held("answer", round_)
                        if delta is not None:
                            yield delta
                    if isinstance(round_.outcome, Completed):
                        for call in self._release_held_tool_calls(round_):
                            yield call
        finally:
            self._round = None
            self._stop_round(producer, round_)

    async def _release_strict(self, item: _Step | _Chunk, round_: _Round) -> TextDelta | None:
        """Strict: a step goes out once it is judged safe (all before it were)."""
        assert isinstance(item, _Step), "strict mode queues no raw chunks"
        verdict = await _verdict_of(item)
        if verdict.unsafe:
            round_.outcome = Flagged(item, verdict)
            return None
        if item.held:
            round_.held_safe.append(item)
            return None
        return self._release(item.record, round_)

    async def _release_fast(self, item: _Step | _Chunk, round_: _Round) -> TextDelta | None:
        """Fast: text goes out as it arrives, once the verdicts on the steps before it are in;
        a step only joins the verdicts to wait for (its chunks went out before it)."""
        behind = round_.judged_behind
        if isinstance(item, _Step):
            if item.held:
                return await self._release_strict(item, round_)
            item.record.released = True
            behind.append(item)
            round_.outcome = _first_unsafe_done(behind)
            return None
        round_.outcome = await self._first_unsafe(behind)
        if round_.outcome is not None:
            return None
        self._note_released(item.delta)
        round_.released_chars += len(item.delta.text)
        return item.delta

    async def _release_tool_call(self, call: ToolCallDelta, round_: _Round
                                 ) -> ToolCallDelta | None:
        """A tool call goes out once everything before it is: in strict mode the steps before
        it were released before it came out of the inbox; in fast mode their verdicts are
        awaited here, so a flag on the text before a call stops the call. Behind held text it
        waits for that text's channel."""
        if self._checking and not self._strict:
            round_.outcome = await self._first_unsafe(round_.judged_behind)
            if round_.outcome is not None:
                return None
        if round_.held_safe or round_.held_tool_calls:
            round_.held_tool_calls.append(call)
            return None
        return self._note_tool_call(call)

    def _release_held_tool_calls(self, round_: _Round) -> list[ToolCallDelta]:
        if round_.held_safe:  # held text is still unresolved: the calls keep waiting behind it
            return []
        calls, round_.held_tool_calls = round_.held_tool_calls, []
        return [self._note_tool_call(call) for call in calls]

    def _note_tool_call(self, call: ToolCallDelta) -> ToolCallDelta:
        self._tool_calls.add(call.data)
        return call

    def _release(self, record: StepRecord, round_: _Round) -> TextDelta:
        record.released = True
        delta = TextDelta(record.channel, record.text)
        self._note_released(delta)
        round_.released_chars += len(delta.text)
        return delta

    def _resolve_held(self, channel: Channel, round_: _Round) -> TextDelta | None:
        """Held text is now known to be ``channel``: every held step before this point was
        judged safe (they came first in the inbox), so it goes out as one delta."""
        steps, round_.held_safe = round_.held_safe, []
        if not steps:
            return None
        for step in steps:
            step.record.channel = channel
            step.record.released = True
        delta = TextDelta(channel, "".join(step.record.text for step in steps))
        self._note_released(delta)
        round_.released_chars += len(delta.text)
        return delta

    async def _produce(self, source: AsyncIterator[UpstreamEvent], round_: _Round) -> None:
        current: Channel | None = None
        handled = 0
        span = self._round_span.child("guardrail.upstream", {
            "guardrail.upstream": self.upstream.name, "guardrail.round": round_.number,
        }, kind="client")
        ending = "cancelled"  # a flag or a client that left stops the upstream early
        try:
            async for event in source:
                handled += 1
                if handled % _YIELD_EVERY == 0:
                    # A burst already in the socket buffer is read without ever suspending;
                    # let the rest of the loop (other streams, this one's sender) run meanwhile.
                    await asyncio.sleep(0)
                if isinstance(event, TextDelta):
                    self._note_first_token()
                    if current is not None and current != event.channel:
                        # The other channel's last sentence is complete once this one starts.
                        self._emit_steps(round_, current, round_.splitters[current].finish())
                    current = event.channel
                    if not self._strict:
                        round_.inbox.put_nowait(_Chunk(event))
                    self._emit_steps(round_, current, round_.splitters[current].feed(event.text))
                    await self._await_verdicts(round_)
                elif isinstance(event, HeldText):
                    self._note_first_token()
                    # Judged as reasoning (what it is, when a template opened the think block).
                    self._emit_steps(round_, "reasoning", round_.held_splitter.feed(event.text),
                                     held=True)
                    await self._await_verdicts(round_)
                elif isinstance(event, HeldResolved):
                    self._emit_steps(round_, "reasoning", round_.held_splitter.finish(),
                                     held=True)
                    round_.inbox.put_nowait(event)
                elif isinstance(event, ToolCallDelta):
                    # The text before a call is complete: it becomes steps now, to be judged
                    # (and, in strict mode, released) before the call goes out.
                    for channel, splitter in round_.splitters.items():
                        self._emit_steps(round_, channel, splitter.finish())
                    self._emit_steps(round_, "reasoning", round_.held_splitter.finish(),
                                     held=True)
                    round_.inbox.put_nowait(event)
                else:
                    round_.inbox.put_nowait(event)
            for channel, splitter in round_.splitters.items():
                self._emit_steps(round_, channel, splitter.finish())
            round_.inbox.put_nowait(_End())
            ending = "completed"
        except UpstreamError as error:
            round_.inbox.put_nowait(_Failure(error))
            ending = "failed"
            span.fail(type(error).__name__)
        except Exception as error:
            # A bug in a backend (a parser, a corrector's stream) still ends the round cleanly.
            logger.error("upstream %s failed", self.upstream.name, exc_info=error)
            round_.inbox.put_nowait(_Failure(UpstreamStreamBroken(
                f"upstream failed: {type(error).__name__}: {error}")))
            ending = "failed"
            span.fail(type(error).__name__)
        finally:
            span.set({"guardrail.outcome": ending, "guardrail.events": handled})
            span.end()
            if isinstance(source, Closable):
                # Closing the upstream generator closes its HTTP request: generation stops.
                # Shielded, so that a second cancellation cannot leave the request open.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(source.aclose())

    async def _await_verdicts(self, round_: _Round) -> None:
        """Backpressure towards the model: while this round has more steps waiting for a verdict
        than ``_READ_AHEAD`` x ``guard.max_concurrency`` (a guard behind under load; its queue
        wait does not count against the checks' timeout), the upstream is not read. Its text
        could only wait here for those verdicts, in both modes, so the client sees the same;
        the model's stream stalls in the socket instead of in the proxy's memory."""
        steps = round_.steps
        while True:
            start = round_.judged_up_to
            while start < len(steps) and _judged(steps[start]):
                start += 1
            round_.judged_up_to = start
            waiting = [check for step in steps[start:]
                       if (check := step.check) is not None and not check.done()]
            if len(waiting) <= self._read_ahead:
                return
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)

    def _note_first_token(self) -> None:
        if self._first_token_at is None:
            self._first_token_at = time.perf_counter()
            elapsed = self._first_token_at - self._started
            self.case.timings.upstream_first_token_ms = elapsed * 1000
            self.metrics.upstream_first_token.observe(elapsed)

    def _emit_steps(self, round_: _Round, channel: Channel, texts: list[str], *,
                    held: bool = False) -> None:
        for text in texts:
            record = StepRecord(index=len(self.case.steps), channel=channel, text=text,
                                round=round_.number, released=not self._checking)
            self.case.steps.append(record)
            check: asyncio.Task[Verdict] | None = None
            if self._checking:
                view = build_view(self._request_text, self._history, text, channel,
                                  self.config.guard.window_steps, round_.number)
                check = asyncio.create_task(self._check(view, record, self._round_span))
                self._checking_started()
            self._history.append(text)
            step = _Step(record, check, held)
            round_.steps.append(step)
            if self._checking:
                round_.inbox.put_nowait(step)
            elif held:
                round_.held_safe.append(step)

    def _checking_started(self) -> None:
        if self._on_checking is not None:
            callback, self._on_checking = self._on_checking, None
            callback()

    def _stop_round(self, producer: asyncio.Task[None], round_: _Round) -> None:
        """Cancel generation and pending checks; what the client did not see is withheld."""
        # Cancel without awaiting: this may run inside a cancelled scope (the client left), where
        # an await would be cancelled again and cut the upstream's clean-up short. The producer
        # closes the upstream itself; the splitters are final once it is cancelled.
        producer.cancel()
        for step in round_.steps:
            if step.check is not None:
                step.check.cancel()
        unreleased: list[str] = []
        if self._strict:
            unreleased += [step.record.text for step in round_.steps if not step.record.released]
            unreleased += [splitter.pending for splitter in round_.splitters.values()]
        else:
            unreleased += [step.record.text for step in round_.steps
                           if step.held and not step.record.released]
            while not round_.inbox.empty():
                item = round_.inbox.get_nowait()
                if isinstance(item, _Chunk):
                    unreleased.append(item.delta.text)
        unreleased.append(round_.held_splitter.pending)
        round_.withheld = "".join(unreleased)
        self.case.withheld += round_.withheld
        if isinstance(round_.outcome, Flagged):
            # Later checks must not see text the client never saw as context.
            self._history = [step.text for step in self.case.steps if step.released]

    # -- guard checks ------------------------------------------------------------------------

    async def _check(self, view: GuardView, record: StepRecord, parent: Span) -> Verdict:
        span = parent.child("guardrail.guard_check", {
            "guardrail.guard": self.guard.name, "guardrail.step": record.index,
            "guardrail.channel": record.channel, "guardrail.round": record.round,
        })
        try:
            queued = time.perf_counter()
            async with self._semaphore:
                waited = time.perf_counter() - queued
                verdict = await self._checker.check(view)
            span.set({"guardrail.wait_ms": waited * 1000, **_verdict_attributes(verdict)})
            if verdict.error is not None:
                span.fail(str(verdict.extra.get("error_kind", "guard_error")))
        except asyncio.CancelledError:
            span.set({"guardrail.cancelled": True})  # the round ended before its verdict
            raise
        finally:
            span.end()
        record_verdict(record, verdict)
        timings = self.case.timings
        timings.guard_total_ms += verdict.latency_s * 1000
        timings.guard_max_ms = max(timings.guard_max_ms, verdict.latency_s * 1000)
        return verdict

    async def _first_unsafe(self, steps: list[_Step]) -> Flagged | None:
        """Fast mode: wait for every verdict still out, in order."""
        while steps:
            step = steps.pop(0)
            if (verdict := await _verdict_of(step)).unsafe:
                return Flagged(step, verdict)
        return None

    # -- after a flag ------------------------------------------------------------------------

    async def _plan_correction(
        self, round_: _Round, outcome: Flagged | Failed
    ) -> tuple[CorrectionPlan, Correction]:
        number = round_.number + 1
        self._start_correction_span(number, outcome)
        correction = Correction(round=number, strategy=self.corrector.name,
                                withheld=round_.withheld)
        self.case.corrections.append(correction)
        self.metrics.wait_tokens.inc(estimate_tokens(round_.withheld))
        if isinstance(outcome, Failed):
            # A continuation that failed before it showed anything: end with the refusal.
            correction.cause = (f"round {round_.number} failed before it showed any text: "
                                f"{type(outcome.error).__name__}: {outcome.error}")
            correction.extra["error"] = f"{type(outcome.error).__name__}: {outcome.error}"
            self.metrics.errors.labels("continuation").inc()
            return await self._apply(RefuseCorrector(self.config.correction), round_, None,
                                     correction)
        record, verdict = outcome.step.record, outcome.verdict
        correction.cause = _flag_cause(record, verdict)
        self.case.flagged.append(
            Flag(step=record.index, categories=list(verdict.categories), score=verdict.score)
        )
        if verdict.error is not None:
            # The guard could not judge and on_error is block: end here, and say so.
            self.case.error = f"guard: {verdict.error}"
            self.case.action = "error"
            self.metrics.errors.labels("guard").inc()
            correction.strategy = "error"
            self._note_plan(correction.strategy, "error", {})
            return CorrectionPlan(action="error", finish_reason="content_filter"), correction
        corrector = self.corrector
        if number > self.config.correction.max_rounds:
            corrector = RefuseCorrector(self.config.correction)
            correction.extra["reason"] = "max_rounds reached"
        return await self._apply(corrector, round_, outcome, correction)

    async def _apply(
        self, corrector: Corrector, round_: _Round, flagged: Flagged | None,
        correction: Correction,
    ) -> tuple[CorrectionPlan, Correction]:
        context = CorrectionContext(
            request=self.request,
            upstream=self.upstream,
            config=self.config.correction,
            released_reasoning="".join(self._released["reasoning"]),
            released_answer="".join(self._released["answer"]),
            withheld=round_.withheld,
            verdict=flagged.verdict if flagged else Verdict(unsafe=True),
            round=correction.round,
            channel=flagged.step.record.channel if flagged else "reasoning",
            flagged_released=(flagged.step.record.text
                              if flagged and flagged.step.record.released else ""),
        )
        plan = await corrector.plan(context)
        self.case.action = plan.action
        correction.strategy = corrector.name
        correction.inserted = "".join(delta.text for delta in plan.inserted)
        correction.extra.update(plan.details)
        self._note_plan(corrector.name, plan.action, plan.details)
        if plan.continuation is not None:
            self.metrics.interventions.labels(corrector.name,
                                              plan.details.get("form", "")).inc()
        return plan, correction

    def _close_correction(self, correction: Correction, round_: _Round,
                          outcome: RoundOutcome) -> None:
        """A continuation round ended: keep what it wrote and how it ended."""
        correction.continuation = round_.text()
        correction.outcome = ("completed" if isinstance(outcome, Completed)
                              else "flagged" if isinstance(outcome, Flagged) else "failed")
        recovered = isinstance(outcome, Completed)
        correction.extra["recovered"] = recovered
        label = {"completed": "recovered", "flagged": "unsafe_again", "failed": "failed"}
        self.metrics.recoveries.labels(label[correction.outcome]).inc()
        self._end_correction_span(label[correction.outcome])
        if recovered:
            self._count_corrections()

    # -- trace spans of corrections ----------------------------------------------------------

    def _start_correction_span(self, number: int, outcome: Flagged | Failed) -> None:
        """A correction round's span: the corrector's plan, then its continuation's upstream
        call and checks as children."""
        attributes: dict[str, str | int | list[str]] = {"guardrail.round": number}
        if isinstance(outcome, Flagged):
            attributes["guardrail.cause"] = "flagged"
            attributes["guardrail.step"] = outcome.step.record.index
            attributes["guardrail.categories"] = list(outcome.verdict.categories)
        else:
            attributes["guardrail.cause"] = "failed"
        self._correction_span = self._round_span = self.span.child("guardrail.correction",
                                                                   attributes)

    def _note_plan(self, strategy: str, action: str, details: Mapping[str, object]) -> None:
        if self._correction_span is not None:
            form = details.get("form")
            self._correction_span.set({"guardrail.strategy": strategy, "guardrail.action": action,
                                       **({"guardrail.form": form} if isinstance(form, str)
                                          else {})})

    def _end_correction_span(self, outcome: str) -> None:
        """``outcome``: recovered, unsafe_again, failed (the continuation's), or ended (no
        continuation: a refusal, a block, an error)."""
        if self._correction_span is not None:
            self._correction_span.set({"guardrail.outcome": outcome})
            self._correction_span.end()
            self._correction_span = None

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
        self.case.tool_calls = self._tool_calls.calls()


def _flag_cause(record: StepRecord, verdict: Verdict) -> str:
    if verdict.error is not None:
        return f"step {record.index} could not be judged ({verdict.error}); on_error is block"
    categories = ", ".join(verdict.categories) or "unsafe"
    score = f" {verdict.score:.2f}" if verdict.score is not None else ""
    return (f"step {record.index} ({record.channel}, round {record.round}) judged unsafe: "
            f"{categories}{score}")


def _verdict_attributes(verdict: Verdict) -> Attributes:
    """What a check span says of its verdict: never the step's text nor the guard's output."""
    attributes: dict[str, str | float | list[str]] = {
        "guardrail.verdict": ("error" if verdict.error is not None
                              else "unsafe" if verdict.unsafe else "safe"),
        "guardrail.categories": list(verdict.categories),
    }
    if verdict.score is not None:
        attributes["guardrail.score"] = verdict.score
    rule = verdict.extra.get("rule")
    if isinstance(rule, str):
        attributes["guardrail.rule"] = rule
    return attributes


def _judged_safe(step: _Step) -> bool:
    check = step.check
    if check is None:
        return True
    return (check.done() and not check.cancelled() and check.exception() is None
            and not check.result().unsafe)


async def _verdict_of(step: _Step) -> Verdict:
    assert step.check is not None
    return await step.check


def _first_unsafe_done(steps: list[_Step]) -> Flagged | None:
    """Fast mode: the first released step whose verdict is back and unsafe (in order)."""
    while steps and steps[0].check is not None and steps[0].check.done():
        step = steps.pop(0)
        verdict = step.check.result() if step.check is not None else None
        if verdict is not None and verdict.unsafe:
            return Flagged(step, verdict)
    return None


def _judged(step: _Step) -> bool:
    """The step's check is over (or it has none), whatever its verdict."""
    return step.check is None or step.check.done()
