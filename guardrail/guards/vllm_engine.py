"""``guard.kind: vllm``: a generative guard model run in-process by a vLLM engine on a GPU.

The same Llama Guard 3 checks as the endpoint backend (``llama-guard`` with ``guard.url``), for
a deployment that wants the guard inside the proxy's process rather than behind its own server:

    pip install 'reasoning-guardrail[vllm]'
    guard:
      kind: vllm
      model: meta-llama/Llama-Guard-3-1B         # a hub id or a local folder
      options:
        format: llama-guard
        engine: {gpu_memory_utilization: 0.3, max_model_len: 8192}   # passed to vllm.LLM

Each batch of checks is one ``LLM.chat`` call with the ``[user, assistant]`` messages of
``llama_guard_format.build_messages`` (neutralised; the model's own chat template renders them,
as the vLLM server would), greedy decoding, and the top logprobs of every generated token. A
checkpoint whose tokenizer has no chat template gets the Llama Guard prompt written by
``llama_guard_format.render_prompt`` through ``LLM.generate`` instead. The score is
P(unsafe) / (P(unsafe) + P(safe)) at the first word after the leading ``\\n\\n``, exactly as for
the endpoint; with a score, ``score >= guard.threshold`` decides.

Concurrent checks are merged into one ``LLM.chat`` call (micro-batching), which runs in a worker
thread so the event loop never blocks on the GPU. vLLM is imported only when this guard is built.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.base import GuardView, Verdict, check_each
from guardrail.guards.llama_guard_format import (
    build_messages,
    parse_verdict,
    render_prompt,
    score_from_logprobs,
)
from guardrail.guards.microbatch import MicroBatcher

DEFAULT_MODEL = "meta-llama/Llama-Guard-3-1B"
INSTALL_HINT = "install with pip install 'reasoning-guardrail[vllm]' (vLLM needs a CUDA GPU)"


class VLLMOptions(BaseModel):
    """``guard.options`` of the vllm guard."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["llama-guard"] = "llama-guard"
    """The guard family's prompt and output format. Llama Guard 3 / 4 for now."""
    max_tokens: int = Field(default=20, ge=1)
    """Room for ``\\n\\nunsafe\\nS1,S2,...``; the model stops by itself well before."""
    top_logprobs: int = Field(default=5, ge=1, le=20)
    batch_size: int = Field(default=32, ge=1)
    """Most checks in one ``LLM.chat`` call."""
    batch_wait_ms: float = Field(default=2.0, ge=0)
    """How long the first check of a burst waits for others to share its call."""
    engine: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for ``vllm.LLM`` (``gpu_memory_utilization``, ``max_model_len``,
    ``dtype``, ``tensor_parallel_size``, ``enable_prefix_caching``...)."""


class ChatEngine(Protocol):
    """What this guard uses of ``vllm.LLM``."""

    def chat(self, messages: Any, sampling_params: Any = ..., use_tqdm: bool = ...) -> Any: ...

    def generate(self, prompts: Any, sampling_params: Any = ..., use_tqdm: bool = ...) -> Any: ...

    def get_tokenizer(self) -> Any: ...


def parse_options(options: Mapping[str, Any]) -> VLLMOptions:
    try:
        return VLLMOptions.model_validate(dict(options))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"guard.options.{where}: {first['msg']}") from None


def sampling_kwargs(options: VLLMOptions) -> dict[str, Any]:
    """``SamplingParams`` for a guard verdict: greedy, short, with the top logprobs."""
    return {"max_tokens": options.max_tokens, "temperature": 0.0,
            "logprobs": options.top_logprobs}


def build_conversations(views: Sequence[GuardView]) -> list[list[dict[str, str]]]:
    """One conversation per view, for one batched ``LLM.chat`` call."""
    return [build_messages(view) for view in views]


def has_chat_template(engine: ChatEngine) -> bool:
    """Whether the engine's tokenizer ships a chat template (Llama Guard's own does)."""
    try:
        tokenizer = engine.get_tokenizer()
    except Exception:  # an engine that cannot say: let LLM.chat decide
        return True
    return bool(getattr(tokenizer, "chat_template", None))


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(f"guard.kind: the vllm guard needs vLLM, which is not installed "
                          f"({error}); {INSTALL_HINT}") from None
    return vllm


def load_engine(model: str, options: VLLMOptions) -> tuple[ChatEngine, Any]:
    """A ``vllm.LLM`` for ``model`` and the ``SamplingParams`` every check uses."""
    vllm = _import_vllm()
    try:
        engine = vllm.LLM(model=model, **options.engine)
    except Exception as error:  # vLLM raises many kinds: no GPU, no such model, OOM
        message = " ".join(str(error).split())[:400]
        raise ConfigError(f"guard.model: vLLM could not load {model!r}: "
                          f"{type(error).__name__}: {message}") from None
    return engine, vllm.SamplingParams(**sampling_kwargs(options))


# -- reading a RequestOutput --------------------------------------------------------------------


def _candidate(token_id: object, logprob: Any) -> dict[str, Any]:
    """A vLLM ``Logprob`` (``logprob``, ``rank``, ``decoded_token``) as an OpenAI entry."""
    return {"token": getattr(logprob, "decoded_token", None) or "",
            "logprob": getattr(logprob, "logprob", None), "id": token_id}


def openai_logprobs(completion: Any) -> dict[str, Any] | None:
    """A vLLM ``CompletionOutput``'s logprobs (one ``{token_id: Logprob}`` per generated token)
    in the chat-completions shape, so that the endpoint's scorer reads both the same way."""
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


def read_output(output: Any) -> tuple[str, dict[str, Any] | None]:
    """``(text, logprobs)`` of a ``RequestOutput``'s first completion."""
    completions = getattr(output, "outputs", None)
    if not completions:
        raise GuardError("vllm: the engine returned no completion")
    completion = completions[0]
    text = getattr(completion, "text", None)
    if not isinstance(text, str):
        raise GuardError(f"vllm: completion text is {type(text).__name__}, not text")
    return text, openai_logprobs(completion)


def verdict_from(text: str, logprobs: object, threshold: float, model: str,
                 latency_s: float = 0.0) -> Verdict:
    """Llama Guard's verdict, decided as the endpoint backend decides it: by the score against
    the threshold where logprobs give one, by the text otherwise."""
    text_unsafe, categories = parse_verdict(text)
    score = score_from_logprobs(logprobs)
    extra: dict[str, str] = {"model": model}
    if score is None:
        unsafe = text_unsafe
        score = 1.0 if text_unsafe else 0.0
        extra["score_source"] = "verdict"
    else:
        unsafe = score >= threshold
        extra["score_source"] = "logprobs"
    if unsafe != text_unsafe:
        extra["text_verdict"] = "unsafe" if text_unsafe else "safe"
    if categories and not unsafe:
        extra["text_categories"] = ",".join(categories)
    return Verdict(unsafe=unsafe, categories=categories if unsafe else (), score=score,
                   raw=text, latency_s=latency_s, extra=extra)


# -- the guard ------------------------------------------------------------------------------------


class VLLMGuard:
    name = "vllm"

    def __init__(self, config: GuardConfig, *, engine: ChatEngine | None = None,
                 sampling_params: Any = None) -> None:
        """``engine`` (and its ``sampling_params``) replace the vLLM engine this would load:
        for tests, and for an application that already holds a ``vllm.LLM``."""
        if config.url:
            raise ConfigError("guard.url: the vllm guard runs the model in-process; for a "
                              "model behind a server use guard.kind llama-guard with guard.url")
        self.config = config
        self.options = parse_options(config.options)
        self.model = config.model or DEFAULT_MODEL
        if engine is None:
            engine, sampling_params = load_engine(self.model, self.options)
        self._engine: ChatEngine | None = engine
        self.chat_template = has_chat_template(engine)
        self._sampling_params = (sampling_params if sampling_params is not None
                                 else sampling_kwargs(self.options))
        self._batcher: MicroBatcher[GuardView, Any] = MicroBatcher(
            self._generate, max_batch=self.options.batch_size,
            max_wait_s=self.options.batch_wait_ms / 1000,
        )

    @property
    def batches(self) -> int:
        """``LLM.chat`` calls so far."""
        return self._batcher.batches

    def _generate(self, views: list[GuardView]) -> Sequence[Any]:
        """One engine call for a batch (in a worker thread); outputs in input order."""
        if self._engine is None:
            raise GuardError("vllm: the guard is closed")
        conversations = build_conversations(views)
        if self.chat_template:
            outputs = self._engine.chat(conversations, sampling_params=self._sampling_params,
                                        use_tqdm=False)
        else:
            # The tokenizer adds its own BOS to a text prompt.
            prompts = [render_prompt(conversation, bos=None) for conversation in conversations]
            outputs = self._engine.generate(prompts, sampling_params=self._sampling_params,
                                            use_tqdm=False)
        return list(outputs)

    async def check(self, view: GuardView) -> Verdict:
        started = time.perf_counter()
        try:
            output = await self._batcher.submit(view)
        except GuardError:
            raise
        except Exception as error:  # CUDA OOM, a prompt longer than max_model_len...
            message = " ".join(str(error).split())[:300]
            raise GuardError(f"vllm {self.model}: {type(error).__name__}: {message}") from None
        text, logprobs = read_output(output)
        return verdict_from(text, logprobs, self.config.threshold, self.model,
                            time.perf_counter() - started)

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        """All in as few ``LLM.chat`` calls as ``options.batch_size`` allows. A malformed
        answer fails the whole call, after every check is done."""
        return await check_each(self.check, views)

    async def aclose(self) -> None:
        # vLLM frees the GPU when the engine is garbage-collected; no public close exists in
        # every supported version.
        self._engine = None
