"""The rate limit's token buckets shared by the workers of one ``guardrail serve --workers N``.

Per-process buckets would let a client whose connections reach N workers make N times the
configured requests. Here the buckets live in one small file that every worker maps
(``SharedBuckets.create`` makes it, in the supervisor's folder): a fixed table of slots, each a
16-byte digest of the identity, its tokens and when they were last counted, found by open
addressing over a short probe window. Each check holds an exclusive ``flock`` on the file for a
few microseconds. The clock is ``time.monotonic``, the same in every process of the machine.
Replicas on other machines still count apart.

Memory is bounded like the in-process buckets: when every slot of an identity's probe window is
taken by others, the one counted longest ago is given to it (that identity starts over with a
full burst when it comes back).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from guardrail.config import RateLimitConfig

SLOTS = 16_384
PROBE = 8
_SLOT = struct.Struct("<16sdd")  # identity digest, tokens, last counted (monotonic seconds)
_EMPTY = bytes(16)


class SharedBuckets:
    """``check(identity)``: 0.0 if allowed, else the seconds to wait (as ``RateLimiter``)."""

    def __init__(self, path: str | Path, config: RateLimitConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if config.requests_per_minute is None:
            raise ValueError("SharedBuckets needs requests_per_minute")
        self.per_second = config.requests_per_minute / 60.0
        self.capacity = float(config.burst or config.requests_per_minute)
        self.clock = clock
        self._file = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._file, SLOTS * _SLOT.size)

    @staticmethod
    def create(path: str | Path) -> None:
        """The empty table (every slot free), readable by this user only."""
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(descriptor, SLOTS * _SLOT.size)
        finally:
            os.close(descriptor)

    def check(self, identity: str) -> float:
        digest = hashlib.sha256(identity.encode()).digest()[:16]
        start = int.from_bytes(digest[:8], "little") % SLOTS
        fcntl.flock(self._file, fcntl.LOCK_EX)
        try:
            now = self.clock()
            slot, tokens, updated = self._find(digest, start, now)
            tokens = min(self.capacity, tokens + max(0.0, now - updated) * self.per_second)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / self.per_second
            _SLOT.pack_into(self._map, slot * _SLOT.size, digest, tokens, now)
            return wait
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    def _find(self, digest: bytes, start: int, now: float) -> tuple[int, float, float]:
        """The identity's slot and its bucket; a new full bucket in a free (or the stalest)
        slot of its window if it has none."""
        free: int | None = None
        stalest, stalest_at = start, float("inf")
        for step in range(PROBE):
            slot = (start + step) % SLOTS
            key, tokens, updated = _SLOT.unpack_from(self._map, slot * _SLOT.size)
            if key == digest:
                return slot, tokens, updated
            if key == _EMPTY:
                if free is None:
                    free = slot
            elif updated < stalest_at:
                stalest, stalest_at = slot, updated
        return (free if free is not None else stalest), self.capacity, now

    def close(self) -> None:
        self._map.close()
        os.close(self._file)
