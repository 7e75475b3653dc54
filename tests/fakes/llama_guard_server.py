"""A fake Llama Guard 3 served the way vLLM serves it, for tests that cannot load the model.

It speaks vLLM's real OpenAI-compatible wire format (``POST /v1/chat/completions``,
``POST /v1/completions`` with one prompt or a list of them, ``GET /v1/models``, ``GET /health``)
and decides from the LAST message (the assistant text, which Llama Guard's template judges; in a
rendered prompt, the last turn of its conversation) with keyword rules. Outputs have the real
model's shapes: ``safe`` or ``unsafe\\nS9``, by default after the ``\\n\\n`` the real model
emits first.

API::

    fake = FakeLlamaGuard(rules={"nerve agent": "S9"})   # keyword (any case) -> category
    app = fake.app()            # a FastAPI app; serve it on 127.0.0.1 (uvicorn) and point the
                                # guard at f"http://127.0.0.1:{port}/v1"
    fake.requests               # JSON bodies received by /v1/chat/completions, in order
    fake.headers                # their headers (lower-case names), same order

Every attribute below may be changed between requests:

- ``served_model``: the model name; a request naming another gets vLLM's 404.
- ``rules``: keyword -> category code. Matching text gets P(unsafe) = ``p_unsafe_match`` at the
  first word, other text ``p_unsafe_no_match``. The text follows greedy decoding: ``unsafe`` iff
  P(unsafe) >= 0.5, with the matched categories (``fallback_category`` if none matched).
- ``leading_newlines``: emit ``\\n\\n`` first, as a separate token (the real model does).
- ``logprobs``: False answers ``logprobs: null`` even when asked, as some servers do.
- ``status``: answer every chat request with this HTTP status and a vLLM-shaped error body.
- ``output``: answer this text instead of a verdict (malformed output).
- ``not_json``: answer 200 with a body that is not JSON.
- ``delay_s``: wait this long before answering (for timeouts); once per request, however many
  prompts it carries (a GPU judges a small batch in about the time of one prompt).
- ``hang_on``: a request whose body contains this text is never answered (a stuck request): it
  is held until the client hangs up (or 30 s pass).
- ``api_key``: require ``Authorization: Bearer <api_key>`` (vLLM's ``--api-key``), else 401.
- ``keep_requests``: False keeps no ``requests`` / ``headers`` (a long benchmark run).

``max_in_flight`` is the most requests it has been answering at once; ``client_ports`` the
client's port of each request (one port for several requests is one kept-alive connection).

Requests are validated as vLLM with Llama Guard's chat template would: roles must alternate
user/assistant starting with user (the template raises otherwise: 400), and ``top_logprobs``
needs ``logprobs: true`` (400).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

DEFAULT_MODEL = "meta-llama/Llama-Guard-3-1B"
_OTHER_MASS = 0.001
"""Probability left to tokens other than safe/unsafe at the first word, so that the score a
client computes is P(unsafe) exactly."""
_TOKEN = re.compile(r"\n+|[A-Za-z]+|\d+|\s+|[^\w\s]")


@dataclass
class FakeLlamaGuard:
    served_model: str = DEFAULT_MODEL
    rules: dict[str, str] = field(default_factory=lambda: {
        "nerve agent": "S9",
        "pipe bomb": "S9",
        "kill him": "S1",
        "launder": "S2",
        "hurt yourself": "S11",
    })
    p_unsafe_match: float = 0.98
    p_unsafe_no_match: float = 0.01
    fallback_category: str = "S1"
    leading_newlines: bool = True
    logprobs: bool = True
    status: int | None = None
    output: str | None = None
    not_json: bool = False
    delay_s: float = 0.0
    hang_on: str | None = None
    api_key: str | None = None
    keep_requests: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    client_ports: list[int] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def app(self) -> FastAPI:
        app = FastAPI(title="fake Llama Guard 3 (vLLM wire format)")

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {
                "object": "list",
                "data": [{
                    "id": self.served_model, "object": "model", "created": int(time.time()),
                    "owned_by": "vllm", "root": self.served_model, "parent": None,
                    "max_model_len": 131072,
                }],
            }

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            with self._counted(request):
                return await self._chat(request)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            with self._counted(request):
                return await self._completions(request)

        return app

    # -- the endpoint --------------------------------------------------------------------------

    @contextmanager
    def _counted(self, request: Request) -> Iterator[None]:
        if self.keep_requests:
            self.client_ports.append(request.client.port if request.client else 0)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _hang_if_asked(self, request: Request, body: Any) -> None:
        if self.hang_on is None or self.hang_on not in json.dumps(body):
            return
        for _ in range(1500):  # 30 s at most, polling for the client's hang-up
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.02)

    async def _receive(self, request: Request) -> tuple[Any, Response | None]:
        """What both routes do first: the key, the JSON body (recorded), the asked-for hang and
        delay, the asked-for failure. The body, and the response that ends the request early."""
        expected = f"Bearer {self.api_key}"
        if self.api_key is not None and request.headers.get("authorization") != expected:
            return None, JSONResponse({"error": "Unauthorized"}, status_code=401)
        try:
            body = await request.json()
        except ValueError:
            return None, _error(400, "BadRequestError", "request body is not valid JSON")
        if self.keep_requests:
            self.requests.append(body)
            self.headers.append({key.lower(): value for key, value in request.headers.items()})
        await self._hang_if_asked(request, body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status is not None:
            return body, _error(self.status, "InternalServerError" if self.status >= 500
                                else "BadRequestError", "fake failure")
        return body, None

    async def _chat(self, request: Request) -> Response:
        body, early = await self._receive(request)
        if early is not None:
            return early
        if self.not_json:
            return PlainTextResponse("<html>502 Bad Gateway</html>", status_code=200)
        if not isinstance(body, dict):
            return _error(400, "BadRequestError", "request body must be an object")
        if body.get("model", self.served_model) != self.served_model:
            return _error(404, "NotFoundError", f"The model `{body.get('model')}` does not exist.")
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            return _error(400, "BadRequestError",
                          "when using `top_logprobs`, `logprobs` must be set to true.")
        messages = body.get("messages")
        problem = _template_problem(messages)
        if problem:
            return _error(400, "BadRequestError", problem)
        assert isinstance(messages, list)
        return JSONResponse(self._completion(body, _text_of(messages[-1])))

    async def _completions(self, request: Request) -> Response:
        """vLLM's ``/v1/completions``: ``prompt`` a string or a list; one choice per prompt, in
        order, each with its ``index`` and completions-shaped logprobs."""
        body, early = await self._receive(request)
        if early is not None:
            return early
        if not isinstance(body, dict):
            return _error(400, "BadRequestError", "request body must be an object")
        if body.get("model", self.served_model) != self.served_model:
            return _error(404, "NotFoundError", f"The model `{body.get('model')}` does not exist.")
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(
                isinstance(prompt, str) for prompt in prompts):
            return _error(400, "BadRequestError", "prompt must be a string or a list of strings")
        chat_body = {"messages": [{"role": "user", "content": ""}],
                     "logprobs": body.get("logprobs") is not None,
                     "top_logprobs": body.get("logprobs")}
        choices = []
        for index, prompt in enumerate(prompts):
            chat = self._completion(chat_body, _last_turn(prompt))["choices"][0]
            choices.append({"index": index, "text": chat["message"]["content"],
                            "logprobs": _completion_logprobs(chat["logprobs"]),
                            "finish_reason": "stop", "stop_reason": None,
                            "prompt_logprobs": None})
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": self.served_model, "choices": choices,
            "usage": {"prompt_tokens": sum(len(p) // 4 for p in prompts),
                      "completion_tokens": 3 * len(prompts),
                      "total_tokens": sum(len(p) // 4 + 3 for p in prompts)},
        })

    def _completion(self, body: dict[str, Any], judged: str) -> dict[str, Any]:
        lowered = judged.lower()
        matched: list[str] = []
        for keyword, code in self.rules.items():
            if keyword.lower() in lowered and code not in matched:
                matched.append(code)
        p_unsafe = self.p_unsafe_match if matched else self.p_unsafe_no_match
        p_unsafe = min(max(p_unsafe, 1e-6), 1 - 1e-6)
        if self.output is not None:
            text = self.output
        elif p_unsafe >= 0.5:
            text = "unsafe\n" + ",".join(matched or [self.fallback_category])
        else:
            text = "safe"
        if self.leading_newlines and self.output is None:
            text = "\n\n" + text
        tokens = _TOKEN.findall(text)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {
                "role": "assistant", "content": text, "refusal": None, "annotations": None,
                "audio": None, "function_call": None, "tool_calls": [], "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
            "token_ids": None,
        }
        if body.get("logprobs") and self.logprobs:
            top_n = int(body.get("top_logprobs") or 0)
            choice["logprobs"] = {"content": _logprobs(tokens, p_unsafe, top_n)}
        prompt_tokens = 230 + sum(len(_text_of(m)) for m in body["messages"]) // 4
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + len(tokens) + 1,
                "completion_tokens": len(tokens) + 1,  # + <|eot_id|>
                "prompt_tokens_details": None,
            },
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "kv_transfer_params": None,
        }


def _error(status: int, kind: str, message: str) -> JSONResponse:
    """vLLM's error body (``ErrorResponse``)."""
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status_code=status,
    )


def _text_of(message: Any) -> str:
    """A message's text: a string, or OpenAI text parts (vLLM's ``openai`` content format)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content
                       if isinstance(part, dict) and part.get("type") == "text")
    return ""


_CONVERSATION = re.compile(r"<BEGIN CONVERSATION>\n\n(.*)<END CONVERSATION>", re.DOTALL)
_TURN = re.compile(r"(?:^|\n\n)(?:User|Agent): ")


def _last_turn(prompt: str) -> str:
    """The last turn of a rendered Llama Guard prompt's conversation: what it judges."""
    found = _CONVERSATION.search(prompt)
    return _TURN.split(found.group(1))[-1] if found else prompt


def _completion_logprobs(chat: Any) -> dict[str, Any] | None:
    """Chat-shaped logprobs in the completions API's shape."""
    if not isinstance(chat, dict):
        return None
    content = chat["content"]
    offsets, at = [], 0
    for entry in content:
        offsets.append(at)
        at += len(entry["token"])
    return {"tokens": [entry["token"] for entry in content],
            "token_logprobs": [entry["logprob"] for entry in content],
            "top_logprobs": [{alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]}
                             for entry in content],
            "text_offset": offsets}


def _template_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if (role == "user") != (index % 2 == 0) or role not in ("user", "assistant"):
            return "Conversation roles must alternate user/assistant/user/assistant/..."
    return None


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(tokens: list[str], p_unsafe: float, top_n: int) -> list[dict[str, Any]]:
    """One entry per generated token, each with its top alternatives sorted by logprob."""
    content: list[dict[str, Any]] = []
    first_word_done = False
    for token in tokens:
        if not first_word_done and token.strip():
            first_word_done = True
            keep = 1 - _OTHER_MASS
            alternatives = [
                ("unsafe", math.log(p_unsafe * keep)),
                ("safe", math.log((1 - p_unsafe) * keep)),
                ("uns", math.log(_OTHER_MASS * 0.6)),
                ("The", math.log(_OTHER_MASS * 0.3)),
                ("I", math.log(_OTHER_MASS * 0.1)),
            ]
            if token not in ("safe", "unsafe"):  # malformed output: make the token the argmax
                alternatives = [(token, math.log(0.9)), *alternatives[2:]]
        else:
            alternatives = [(token, -0.0005), (" ", -8.1), ("\n", -9.3), ("S", -10.2)]
            alternatives = [alternatives[0]] + [alt for alt in alternatives[1:]
                                                if alt[0] != token]
        alternatives.sort(key=lambda pair: pair[1], reverse=True)
        chosen = dict(alternatives)[token]
        entry = _entry(token, chosen)
        entry["top_logprobs"] = [_entry(name, value) for name, value in alternatives[:top_n]]
        content.append(entry)
    return content
