"""Records every case, even when the store cannot take it.

A case the database refuses (down, locked, full, a value it cannot represent) is appended as one
JSON line to a local fallback file instead, from which it can be replayed later: the record of
what the guard saw is the raw material of the offline loop and must not be dropped because of an
outage.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from guardrail.cases.base import CaseStore
from guardrail.cases.model import Case
from guardrail.cases.redact import redact

logger = logging.getLogger(__name__)


class CaseRecorder:
    def __init__(
        self,
        store: CaseStore,
        fallback_path: str | Path,
        on_failure: Callable[[Exception], None] | None = None,
        redact: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.fallback_path = Path(fallback_path)
        self.on_failure = on_failure
        self.redact = tuple(redact)
        """Case fields blanked before anything is written (store.redact)."""
        # Lines from this process never interleave; O_APPEND keeps other processes' whole too.
        self._lock = threading.Lock()

    async def begin(self, case: Case) -> None:
        """Store the case as it stands, marked ``in_progress``, before its response starts.

        The client learns the case id from the response headers, long before :meth:`record`
        stores the finished case; a crash in between would leave the id pointing at nothing.
        One upsert of a snapshot (the live case keeps changing while the response streams);
        :meth:`record` later replaces it. A failure goes to the fallback file, as in record."""
        await self._store(case.model_copy(update={"status": "in_progress"}))

    async def record(self, case: Case) -> bool:
        """Store the case; True if the store took it, False if it went to the fallback file."""
        return await self._store(case)

    async def _store(self, case: Case) -> bool:
        # Redacted here, so the in-progress row, the final row and the fallback line all are.
        case = redact(case, self.redact)
        try:
            await self.store.put(case)
        except asyncio.CancelledError:
            # The request was cancelled mid-write (client gone, shutdown): whether the row
            # landed is unknown, so keep a copy (a replay upserts by id, duplicates are harmless)
            # and let the cancellation go on.
            self._keep(case.id, self._line(case), "cancelled while storing")
            raise
        except Exception as exc:
            logger.warning(
                "case %s not stored (%s); appending it to %s", case.id, exc, self.fallback_path
            )
            # Serialised here, on the event loop: a snapshot from begin() shares its lists with
            # the live case, which the stream may change while the worker thread writes.
            await asyncio.to_thread(self._keep, case.id, self._line(case), str(exc))
            if self.on_failure is not None:
                try:
                    self.on_failure(exc)
                except Exception:
                    logger.exception("case recorder on_failure callback failed")
            return False
        return True

    @staticmethod
    def _line(case: Case) -> bytes:
        return (case.model_dump_json() + "\n").encode()

    def _keep(self, case_id: str, line: bytes, reason: str) -> None:
        try:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                descriptor = os.open(
                    self.fallback_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
                )
                try:
                    view = memoryview(line)
                    while view:  # one write in practice; the loop covers a short write
                        view = view[os.write(descriptor, view):]
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        except OSError:
            # Both the store and the disk failed: the log is the last place left to keep it.
            logger.exception(
                "case %s lost by store (%s) and by fallback file %s; record follows: %s",
                case_id, reason, self.fallback_path, line.decode().rstrip("\n"),
            )


@dataclass(frozen=True, slots=True)
class UnreadableLine:
    """A fallback line that is not a case (torn by a crash, or of an unknown schema version)."""

    number: int
    problem: str


def iter_fallback(path: str | Path) -> Iterator[Case | UnreadableLine]:
    """The cases kept in a fallback file, in the order they were written, read a line at a
    time (the file can be large after a long outage); a line that is not a case comes as an
    ``UnreadableLine`` in its place. ``FileNotFoundError`` if there is no file."""
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield Case.model_validate_json(line)
            except ValueError as exc:
                lines_of = [part.strip() for part in str(exc).splitlines() if part.strip()]
                yield UnreadableLine(number, " ".join(lines_of[:3])[:300])


def read_fallback(path: str | Path) -> list[Case]:
    """The cases kept in a fallback file, in the order they were written (for replay)."""
    cases: list[Case] = []
    try:
        for entry in iter_fallback(path):
            if isinstance(entry, UnreadableLine):
                # A line torn by a crash mid-write must not hide the others.
                logger.warning("%s line %d is not a case, skipped: %s",
                               path, entry.number, entry.problem)
            else:
                cases.append(entry)
    except FileNotFoundError:
        pass
    return cases
