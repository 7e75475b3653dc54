"""A fake OpenAI-compatible server for generative guards, in vLLM's wire format.

``POST /v1/chat/completions`` and ``POST /v1/completions`` answer whatever ``answer(body)``
returns: the generated text, and optionally the probabilities of alternative tokens at the
position where the verdict word starts (the token the client scores). The logprobs have vLLM's
shapes: chat ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`` and
completions ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``.

    fake = FakeGuardServer(lambda body: Answer("Safety: Unsafe\\nCategories: Violent",
                                               at=8, alternatives={" Unsafe": 0.7, " Safe": 0.3}))
    with serve_app(fake.app(), lifespan="off") as url: ...   # guard.url = url + "/v1"
    fake.requests   # the JSON bodies, in order
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

_TOKEN = re.compile(r"\n+|\s?[A-Za-z]+|\d+|\s+|[^\w\s]")
_OTHER = "<|other|>"


@dataclass(frozen=True)
class Answer:
    text: str
    at: int | None = None
    """Where the verdict word starts in ``text``; the token there gets ``alternatives``."""
    alternatives: dict[str, float] | None = None
    """Probabilities of tokens at that position (the chosen token's included)."""


@dataclass
class FakeGuardServer:
    answer: Callable[[dict[str, Any]], Answer]
    served_model: str | None = None
    """If set, a request naming another model gets vLLM's 404."""
    logprobs: bool = True
    status: int | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI(title="fake guard server (vLLM wire format)")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._handle(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._handle(request, chat=False)

        return app

    async def _handle(self, request: Request, *, chat: bool) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.paths.append(request.url.path)
        if self.status is not None:
            return _error(self.status, "fake failure")
        if self.served_model is not None and body.get("model") != self.served_model:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        answer = self.answer(body)
        tokens = _TOKEN.findall(answer.text)
        assert "".join(tokens) == answer.text
        offsets = [sum(len(token) for token in tokens[:index]) for index in range(len(tokens))]
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "stop_reason": None}
        wanted = body.get("logprobs")
        if chat:
            choice["message"] = {"role": "assistant", "content": answer.text, "tool_calls": []}
            choice["logprobs"] = (
                {"content": [_chat_entry(token, offset, answer, int(body.get("top_logprobs") or 0))
                             for token, offset in zip(tokens, offsets, strict=True)]}
                if wanted and self.logprobs else None
            )
        else:
            choice["text"] = answer.text
            choice["logprobs"] = (
                _completion_logprobs(tokens, offsets, answer, int(wanted))
                if wanted and self.logprobs else None
            )
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [choice],
            "usage": {"prompt_tokens": 100, "completion_tokens": len(tokens),
                      "total_tokens": 100 + len(tokens)},
        })


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError",
                                   "param": None, "code": status}}, status_code=status)


def _alternatives(token: str, offset: int, answer: Answer) -> list[tuple[str, float]]:
    """(token, logprob) at this position, most likely first."""
    covers = answer.at is not None and offset <= answer.at < offset + len(token)
    if covers and answer.alternatives:
        pairs = [(name, math.log(p)) for name, p in answer.alternatives.items() if p > 0]
        rest = 1.0 - sum(answer.alternatives.values())
        if rest > 1e-9:
            pairs.append((_OTHER, math.log(rest)))
    else:
        pairs = [(token, -0.0005), (_OTHER, -8.0)]
    return sorted(pairs, key=lambda pair: -pair[1])


def _chat_entry(token: str, offset: int, answer: Answer, top_n: int) -> dict[str, Any]:
    pairs = _alternatives(token, offset, answer)
    chosen = dict(pairs).get(token, -0.0005)
    return {
        "token": token, "logprob": chosen, "bytes": list(token.encode()),
        "top_logprobs": [{"token": name, "logprob": value, "bytes": list(name.encode())}
                         for name, value in pairs[:top_n]],
    }


def _completion_logprobs(tokens: list[str], offsets: list[int], answer: Answer,
                         top_n: int) -> dict[str, Any]:
    tops = [_alternatives(token, offset, answer) for token, offset in zip(tokens, offsets,
                                                                          strict=True)]
    return {
        "tokens": tokens,
        "token_logprobs": [dict(pairs).get(token, -0.0005) for token, pairs in zip(tokens, tops,
                                                                                  strict=True)],
        "top_logprobs": [dict(pairs[:top_n]) for pairs in tops],
        "text_offset": offsets,
    }
