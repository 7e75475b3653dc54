"""A per-key rate limit on chat completions (``server.rate_limit``): a token bucket per API key,
per client address when auth is off or the key is not a configured one.

It is ASGI middleware rather than part of the chat route so that a refused request costs no body
parsing, no upstream call and no case record. Buckets live in memory (``RateLimiter``), or, for
the workers of one ``guardrail serve --workers N``, in a file they all map
(``server/shared_rate_limit.py``), so the limit holds across them. Replicas count apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from guardrail.config import RateLimitConfig, ServerConfig
from server.auth import bearer_token, is_known_key
from server.protocol import error_body

LIMITED_PATHS = frozenset({"/v1/chat/completions"})
MAX_BUCKETS = 10_000
"""Bounds memory when many addresses call: the least recently used bucket is dropped first."""


@dataclass
class TokenBucket:
    capacity: float
    per_second: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token; 0.0 if there was one, else the seconds until there will be."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.per_second)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.per_second


class Buckets(Protocol):
    def check(self, identity: str) -> float:
        """Count one request for ``identity``: 0.0 if allowed, else seconds to wait."""


class RateLimiter:
    def __init__(self, config: RateLimitConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if config.requests_per_minute is None:
            raise ValueError("RateLimiter needs requests_per_minute")
        self.per_second = config.requests_per_minute / 60.0
        self.capacity = float(config.burst or config.requests_per_minute)
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(self, identity: str) -> float:
        """Count one request for ``identity``: 0.0 if allowed, else seconds to wait."""
        now = self.clock()
        bucket = self._buckets.get(identity)
        if bucket is None:
            bucket = TokenBucket(self.capacity, self.per_second, self.capacity, now)
            self._buckets[identity] = bucket
            if len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(identity)
        return bucket.take(now)


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, server: ServerConfig,
                 clock: Callable[[], float] = time.monotonic,
                 shared_file: Path | None = None) -> None:
        self.app = app
        self.limiter: Buckets
        if shared_file is not None:
            from server.shared_rate_limit import SharedBuckets

            self.limiter = SharedBuckets(shared_file, server.rate_limit, clock)
        else:
            self.limiter = RateLimiter(server.rate_limit, clock)
        self.keys = list(server.api_keys) + [key for _, key in server.named_admin_keys()]

    def _identity(self, scope: Scope) -> str:
        token = bearer_token(Headers(scope=scope))
        if token is not None and self.keys and is_known_key(token, self.keys):
            # A digest, not the key, so the key is not kept in one more place.
            return "key:" + hashlib.sha256(token.encode()).hexdigest()
        # Unknown keys share their address's bucket, so guessing keys is limited too and
        # made-up keys cannot each get a fresh bucket.
        client = scope.get("client")
        return f"addr:{client[0] if client else 'unknown'}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"] not in LIMITED_PATHS):
            await self.app(scope, receive, send)
            return
        wait = self.limiter.check(self._identity(scope))
        if wait <= 0.0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        body = json.dumps(error_body(
            f"rate limit exceeded: retry after {retry_after} s", "rate_limit_error",
            code="rate_limit_exceeded",
        )).encode()
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(retry_after).encode())]})
        await send({"type": "http.response.body", "body": body})
