"""Server-sent events, and a streaming response that notices a client leaving at once.

Starlette's StreamingResponse, under ASGI 2.4 servers, only notices a disconnect on its next
write; while the proxy waits on a verdict or a slow model that can be a long time of wasted
generation. This response always listens for ``http.disconnect`` and cancels the stream, and it
closes the body iterator itself so the proxy's clean-up (cancel upstream, store the case) runs
deterministically.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from guardrail.events import Closable


def sse_event(data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + payload.encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class DisconnectAwareStreamingResponse(StreamingResponse):
    body_iterator: AsyncIterator[bytes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if isinstance(self.body_iterator, Closable):
                    await self.body_iterator.aclose()
