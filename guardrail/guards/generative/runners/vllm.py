"""``runner: vllm``: the guard model run in-process by a vLLM engine on a GPU, for any family.

For a deployment that wants the guard inside the proxy's process rather than behind its own
server:

    pip install 'reasoning-guardrail[vllm]'
    guard:
      kind: qwen3guard                         # any generative family
      runner: vllm
      model: Qwen/Qwen3Guard-Gen-4B            # a hub id or a local folder
      options:
        engine: {gpu_memory_utilization: 0.3, max_model_len: 8192}   # passed to vllm.LLM

(``kind: vllm`` with ``options.format: <family>``, Llama Guard by default, is the older spelling
of the same.) A family's requests are answered as a server would answer them: a ``ChatRequest``
through ``LLM.chat`` (the model's own chat template, with ``chat_template_kwargs``), a
``PromptRequest`` through ``LLM.generate``; a checkpoint whose tokenizer has no chat template gets
the family's own rendering of the prompt (``ChatRequest.fallback_prompt``) through
``LLM.generate``. Decoding is greedy, with the top logprobs of every generated token, read in the
chat-completions shape so that a family scores vLLM's answer exactly as an endpoint's.

Concurrent requests are merged (micro-batching) into as few engine calls as their shapes allow
(one per distinct template arguments and answer length), run in a worker thread so that the event
loop never blocks on the GPU. vLLM is imported when the runner is built; the engine is loaded at
warm-up (or by the first check).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.generative.runners.text import (
    ChatRequest,
    Completion,
    TextRequest,
    chat_logprobs,
)
from guardrail.guards.generative.runners.transformers import control_tokens
from guardrail.guards.plumbing.microbatch import MicroBatcher

INSTALL_HINT = "install with pip install 'reasoning-guardrail[vllm]' (vLLM needs a CUDA GPU)"


class VLLMOptions(BaseModel):
    """The ``guard.options`` this runner reads."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, ge=1)
    """Caps every answer's length; by default each family's own (20 tokens for Llama Guard)."""
    top_logprobs: int = Field(default=5, ge=1, le=20)
    batch_size: int = Field(default=32, ge=1)
    """Most requests in one engine call."""
    batch_wait_ms: float = Field(default=2.0, ge=0)
    """How long the first request of a burst waits for others to share its call."""
    engine: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for ``vllm.LLM`` (``gpu_memory_utilization``, ``max_model_len``,
    ``dtype``, ``tensor_parallel_size``, ``enable_prefix_caching``...)."""


VLLM_OPTIONS = tuple(VLLMOptions.model_fields)


class ChatEngine(Protocol):
    """What this runner uses of ``vllm.LLM``."""

    def chat(self, messages: Any, sampling_params: Any = ..., use_tqdm: bool = ...,
             chat_template_kwargs: dict[str, Any] | None = ...) -> Any: ...

    def generate(self, prompts: Any, sampling_params: Any = ..., use_tqdm: bool = ...) -> Any: ...

    def get_tokenizer(self) -> Any: ...


def parse_options(options: Mapping[str, Any]) -> VLLMOptions:
    try:
        return VLLMOptions.model_validate(dict(options))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"guard.options.{where}: {first['msg']}") from None


def sampling_kwargs(options: VLLMOptions, max_tokens: int) -> dict[str, Any]:
    """``SamplingParams`` for a guard's answer: greedy, short, with the top logprobs."""
    return {"max_tokens": options.max_tokens or max_tokens, "temperature": 0.0,
            "logprobs": options.top_logprobs}


def has_chat_template(engine: ChatEngine) -> bool:
    """Whether the engine's tokenizer ships a chat template (the guards' own do)."""
    try:
        tokenizer = engine.get_tokenizer()
    except Exception:  # an engine that cannot say: let LLM.chat decide
        return True
    return bool(getattr(tokenizer, "chat_template", None))


def _import_vllm(field: str) -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(f"{field}: the vllm runner needs vLLM, which is not installed "
                          f"({error}); {INSTALL_HINT}") from None
    return vllm


# -- reading a RequestOutput --------------------------------------------------------------------


def _candidate(token_id: object, logprob: Any) -> dict[str, Any]:
    """A vLLM ``Logprob`` (``logprob``, ``rank``, ``decoded_token``) as an OpenAI entry."""
    return {"token": getattr(logprob, "decoded_token", None) or "",
            "logprob": getattr(logprob, "logprob", None), "id": token_id}


def openai_logprobs(completion: Any) -> dict[str, Any] | None:
    """A vLLM ``CompletionOutput``'s logprobs (one ``{token_id: Logprob}`` per generated token)
    in the chat-completions shape, so that an endpoint's answer and vLLM's are read alike."""
    positions = getattr(completion, "logprobs", None)
    if not positions:
        return None
    token_ids = list(getattr(completion, "token_ids", None) or [])
    content: list[dict[str, Any]] = []
    for index, candidates in enumerate(positions):
        if not isinstance(candidates, Mapping) or not candidates:
            continue
        top = [_candidate(token_id, logprob) for token_id, logprob in candidates.items()]
        sampled_id = token_ids[index] if index < len(token_ids) else None
        sampled = candidates.get(sampled_id)
        if sampled is None:  # no token ids: take the most likely (greedy decoding chose it)
            sampled_id, sampled = max(candidates.items(),
                                      key=lambda item: getattr(item[1], "logprob", -1e9))
        entry = _candidate(sampled_id, sampled)
        entry["top_logprobs"] = top
        content.append(entry)
    return {"content": content}


def read_output(output: Any) -> Completion:
    """The ``Completion`` of a ``RequestOutput``'s first answer."""
    completions = getattr(output, "outputs", None)
    if not completions:
        raise GuardError("vllm: the engine returned no completion")
    completion = completions[0]
    text = getattr(completion, "text", None)
    if not isinstance(text, str):
        raise GuardError(f"vllm: completion text is {type(text).__name__}, not text")
    return Completion(text, chat_logprobs(openai_logprobs(completion)))


# -- the runner -----------------------------------------------------------------------------------


class VLLMRunner:
    name = "vllm"
    option_keys = VLLM_OPTIONS

    def __init__(self, config: GuardConfig, *, model: str, guard: str,
                 engine: ChatEngine | None = None) -> None:
        """``engine`` replaces the ``vllm.LLM`` this would load (its sampling parameters are
        then plain dicts): for tests, and for an application that already holds an engine."""
        if config.url:
            raise ConfigError("guard.url: the vllm runner runs the model in-process; for a "
                              "model behind a server use runner: endpoint (or drop runner)")
        self.model = model
        self.guard = guard
        self.options = parse_options({key: value for key, value in config.options.items()
                                      if key in VLLM_OPTIONS})
        # Named by the field that chose vLLM: guard.kind (vllm) or guard.runner.
        field = "guard.kind" if config.kind == "vllm" else "guard.runner"
        self._vllm: Any = None if engine is not None else _import_vllm(field)
        self._engine = engine
        self._closed = False
        self._load_lock = threading.Lock()
        self.chat_template = has_chat_template(engine) if engine is not None else True
        self._batcher: MicroBatcher[TextRequest, Any] = MicroBatcher(
            self._run, max_batch=self.options.batch_size,
            max_wait_s=self.options.batch_wait_ms / 1000,
        )

    @property
    def batches(self) -> int:
        """Engine calls so far (each may answer many requests)."""
        return self._batcher.batches

    def load(self) -> None:
        """Load the engine now (blocking: a minute or more). Safe to call many times."""
        with self._load_lock:
            if self._closed:
                raise GuardError(f"vllm: the {self.guard} guard is closed")
            if self._engine is not None:
                return
            try:
                engine: ChatEngine = self._vllm.LLM(model=self.model, **self.options.engine)
            except Exception as error:  # vLLM raises many kinds: no GPU, no such model, OOM
                message = " ".join(str(error).split())[:400]
                raise ConfigError(f"guard.model: vLLM could not load {self.model!r}: "
                                  f"{type(error).__name__}: {message}") from None
            self.chat_template = has_chat_template(engine)
            self._engine = engine

    def special_tokens(self) -> tuple[str, ...]:
        try:
            return control_tokens(self._loaded().get_tokenizer())
        except (AttributeError, TypeError):  # not a Hugging Face tokenizer: the family's own
            return ()

    def _loaded(self) -> ChatEngine:
        if self._engine is None:
            self.load()
        assert self._engine is not None
        return self._engine

    def _sampling(self, max_tokens: int) -> Any:
        kwargs = sampling_kwargs(self.options, max_tokens)
        return kwargs if self._vllm is None else self._vllm.SamplingParams(**kwargs)

    def _run(self, requests: list[TextRequest]) -> list[Any]:
        """One engine call per request shape (in a worker thread); ``RequestOutput``s in input
        order, each read by its own caller (a malformed answer fails only its own check)."""
        engine = self._loaded()
        calls: dict[tuple[str, str, int], list[int]] = {}
        for index, request in enumerate(requests):
            calls.setdefault(self._call_of(request), []).append(index)
        answers: dict[int, Any] = {}
        for (method, template_kwargs, max_tokens), indices in calls.items():
            sampling = self._sampling(max_tokens)
            if method == "chat":
                conversations = [[dict(message) for message in chat.messages]
                                 for i in indices if isinstance(chat := requests[i], ChatRequest)]
                extra = {"chat_template_kwargs": json.loads(template_kwargs)} \
                    if template_kwargs != "{}" else {}
                outputs = engine.chat(conversations, sampling_params=sampling, use_tqdm=False,
                                      **extra)
            else:
                prompts = [self._prompt(requests[i]) for i in indices]
                outputs = engine.generate(prompts, sampling_params=sampling, use_tqdm=False)
            for index, output in zip(indices, list(outputs), strict=True):
                answers[index] = output
        return [answers[index] for index in range(len(requests))]

    def _call_of(self, request: TextRequest) -> tuple[str, str, int]:
        if isinstance(request, ChatRequest) and self.chat_template:
            return ("chat", json.dumps(dict(request.template_kwargs), sort_keys=True),
                    request.max_tokens)
        return ("generate", "", request.max_tokens)

    def _prompt(self, request: TextRequest) -> str:
        if not isinstance(request, ChatRequest):
            return request.prompt
        if request.fallback_prompt is None:
            raise ConfigError(f"guard.model: the tokenizer of {self.model} has no chat template, "
                              f"and {self.guard} has no prompt of its own to use instead")
        return request.fallback_prompt

    async def complete(self, request: TextRequest) -> Completion:
        try:
            output = await self._batcher.submit(request)
        except (GuardError, ConfigError):
            raise
        except Exception as error:  # CUDA OOM, a prompt longer than max_model_len...
            message = " ".join(str(error).split())[:300]
            raise GuardError(f"vllm {self.model}: {type(error).__name__}: {message}") from None
        return read_output(output)

    async def aclose(self) -> None:
        # vLLM frees the GPU when the engine is garbage-collected; no public close exists in
        # every supported version.
        with self._load_lock:
            self._engine = None
            self._closed = True
