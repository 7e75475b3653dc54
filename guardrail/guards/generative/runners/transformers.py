"""``runner: transformers``: the guard model in-process, with transformers (the default without
``guard.url``).

The guards differ in their prompt and answer words, not in how a model is run, so the running lives
here: load ``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local folder or a hub id, render a
chat template, and answer two questions about a batch of prompts:

- ``score``: the next-token probabilities of a few answer tokens at the end of each prompt, from
  ONE forward pass (no generation). This is how a verdict word is scored: P(``unsafe``) vs
  P(``safe``), P(``Yes``) vs P(``No``).
- ``generate``: a short greedy continuation (categories of a flagged step; WildGuard's three
  answers), with the probabilities of some watched tokens at each step.

Batches are left-padded so every prompt ends at the last position; position ids follow the
attention mask, so a padded prompt scores as it would alone. Concurrent calls from the event loop
are merged into micro-batches (``MicroBatcher``) and run in a worker thread, one batch at a time
per model, so the loop never blocks on inference.

torch and transformers are imported only when a model is loaded: choosing another guard costs
nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.plumbing.microbatch import MicroBatcher

RUNNER_OPTIONS = ("device", "dtype", "batch_size", "batch_wait_ms")
"""``guard.options`` keys read here; the families add their own."""
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RunnerSettings:
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``..."""
    dtype: str = "auto"
    """``auto``: bfloat16 on CUDA, float32 elsewhere."""
    batch_size: int = 8
    batch_wait_ms: float = 2.0
    """How long the first check of a burst waits for others to share its forward pass."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RunnerSettings:
        device = options.get("device", cls.device)
        dtype = options.get("dtype", cls.dtype)
        batch_size = options.get("batch_size", cls.batch_size)
        wait = options.get("batch_wait_ms", cls.batch_wait_ms)
        if not isinstance(device, str) or not device:
            raise ConfigError("guard.options.device: expected a device name such as cpu or cuda")
        if dtype not in _DTYPES:
            raise ConfigError(f"guard.options.dtype: expected one of {', '.join(_DTYPES)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("guard.options.batch_size: expected an integer >= 1")
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            raise ConfigError("guard.options.batch_wait_ms: expected a number >= 0")
        return cls(device=device, dtype=dtype, batch_size=batch_size, batch_wait_ms=float(wait))


@dataclass(frozen=True)
class Generated:
    """A greedy continuation: its text (special tokens dropped), its token ids, and for each
    generated step the probabilities of the watched token ids at that step."""

    text: str
    token_ids: tuple[int, ...]
    watched: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class _GenerateRequest:
    prompt: str
    max_new_tokens: int
    watch: tuple[int, ...]


class HFRunner:
    """A lazily loaded model + tokenizer; thread-safe, one inference at a time."""

    name = "transformers"
    option_keys = RUNNER_OPTIONS

    @classmethod
    def from_config(cls, config: GuardConfig, *, model: str, guard: str) -> HFRunner:
        if config.url:
            raise ConfigError(f"guard.url: the transformers runner runs {guard} in-process; "
                              "drop guard.url, or use runner: endpoint")
        return cls(model, RunnerSettings.from_options(config.options), guard=guard)

    def __init__(self, model: str, settings: RunnerSettings, *, guard: str) -> None:
        self.model_name = model
        self.settings = settings
        self.guard = guard
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: Any = None
        self._keeps_logits = False
        self._eos_ids: tuple[int, ...] = ()
        self._pad_id = 0
        self._content_parts: bool | None = None
        self._continuations: dict[tuple[str, tuple[str, ...]], tuple[int, ...]] = {}
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        wait_s = settings.batch_wait_ms / 1000
        self._scorer: MicroBatcher[tuple[str, tuple[int, ...]], tuple[float, ...]] = (
            MicroBatcher(self.score_batch, max_batch=settings.batch_size, max_wait_s=wait_s)
        )
        self._generator: MicroBatcher[_GenerateRequest, Generated] = MicroBatcher(
            self._generate_requests, max_batch=settings.batch_size, max_wait_s=wait_s
        )

    # -- loading ---------------------------------------------------------------------------------

    @property
    def batches(self) -> int:
        """Forward passes (scoring) and generate calls run so far; each may serve many checks."""
        return self._scorer.batches + self._generator.batches

    @property
    def model(self) -> str:
        return self.model_name

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model now (blocking: seconds to minutes). Safe to call many times."""
        with self._load_lock:
            if self._model is not None:
                return
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = Path(self.model_name).expanduser()
            local = path.is_dir()
            source = str(path) if local else self.model_name
            device = self._resolve_device(torch)
            dtype = self._resolve_dtype(torch, device)
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
                model: Any = AutoModelForCausalLM.from_pretrained(
                    source, dtype=dtype, local_files_only=local
                )
            except (OSError, ValueError) as error:
                raise ConfigError(
                    f"guard.model: {self.guard} cannot load {self.model_name!r} "
                    f"({type(error).__name__}: {error})"
                ) from None
            try:
                model.to(device)
            except (RuntimeError, AssertionError) as error:  # no such GPU, torch built without
                raise ConfigError(f"guard.options.device: cannot use {device}: {error}") from None
            model.eval()
            self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
            eos: list[int] = []
            for source_ids in (tokenizer.eos_token_id, model.generation_config.eos_token_id):
                if isinstance(source_ids, int):
                    eos.append(source_ids)
                elif isinstance(source_ids, list):
                    eos.extend(i for i in source_ids if isinstance(i, int))
            self._eos_ids = tuple(dict.fromkeys(eos))
            pad = tokenizer.pad_token_id
            self._pad_id = pad if isinstance(pad, int) else (eos[0] if eos else 0)
            self._tokenizer = tokenizer
            self._device = device
            self._model = model

    def _resolve_device(self, torch: Any) -> Any:
        name = self.settings.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return torch.device(name)
        except RuntimeError:
            raise ConfigError(f"guard.options.device: unknown device {name!r}") from None

    def _resolve_dtype(self, torch: Any, device: Any) -> Any:
        name = self.settings.dtype
        if name == "auto":
            name = "bfloat16" if device.type == "cuda" else "float32"
        return getattr(torch, name)

    async def ensure_loaded(self) -> None:
        if self._model is None:
            await asyncio.to_thread(self.load)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Drop the model (its memory goes with it once a running batch ends); a later call
        loads it again."""
        with self._load_lock:
            self._model = None
            self._tokenizer = None

    def _loaded(self) -> tuple[Any, Any]:
        """(model, tokenizer), loading them if needed. Callers keep these references for the
        whole batch, so ``close`` from another thread cannot pull the model from under them."""
        model, tokenizer = self._model, self._tokenizer
        if model is None or tokenizer is None:
            self.load()
            model, tokenizer = self._model, self._tokenizer
        return model, tokenizer

    @property
    def tokenizer(self) -> Any:
        return self._loaded()[1]

    # -- text ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model reads it: no BOS added (templates write their own)."""
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def special_tokens(self) -> tuple[str, ...]:
        """The control tokens judged text must never be allowed to produce: every special token,
        and every other added token that the chat template writes (Qwen's ``<think>``). Added
        tokens that are ordinary markup (Gemma lists ``<table>``) stay readable text."""
        return control_tokens(self.tokenizer)

    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool,
        **template_kwargs: Any,
    ) -> str | None:
        """The tokenizer's own chat template applied to ``messages``; None if it has none.

        Some templates read ``content`` as a string (Llama Guard 3 8B, Qwen3Guard), others as a
        list of ``{"type": "text"}`` parts (Llama Guard 3 1B), and the latter silently drop a
        string. The first render finds out which, by checking the text made it into the prompt.
        """
        if not self.has_chat_template():
            return None
        texts = [message["content"].strip() for message in messages]
        if self._content_parts is None:
            for parts in (False, True):
                rendered = self._render(messages, parts, add_generation_prompt, template_kwargs)
                if all(text in rendered for text in texts):
                    if any(texts):
                        self._content_parts = parts
                    return rendered
            raise GuardError(
                f"{self.guard}: the chat template of {self.model_name} drops the message text "
                "(neither string contents nor text parts appear in the prompt)"
            )
        return self._render(messages, self._content_parts, add_generation_prompt, template_kwargs)

    def _render(
        self,
        messages: Sequence[Mapping[str, str]],
        parts: bool,
        add_generation_prompt: bool,
        template_kwargs: Mapping[str, Any],
    ) -> str:
        chat: list[dict[str, Any]] = [
            {"role": message["role"],
             "content": [{"type": "text", "text": message["content"]}] if parts
             else message["content"]}
            for message in messages
        ]
        try:
            rendered = self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=add_generation_prompt,
                **template_kwargs,
            )
        except Exception as error:  # jinja2 errors, raise_exception() in the template
            raise GuardError(
                f"{self.guard}: the chat template failed: {type(error).__name__}: {error}"
            ) from None
        return str(rendered)

    def continuation_ids(self, context: str, words: Sequence[str]) -> tuple[int, ...]:
        """The first token of each of ``words`` when the model writes it right after ``context``.

        Found by tokenizing ``context + word``, so leading spaces, SentencePiece's ``▁`` and
        byte-level ``Ġ`` come out as the model would produce them. The answers must start with
        different tokens and must not merge with the end of the context, or one forward pass
        could not tell them apart.
        """
        key = (context[-64:], tuple(words))
        cached = self._continuations.get(key)
        if cached is not None:
            return cached
        base = self.encode(context)
        found: list[int] = []
        for word in words:
            full = self.encode(context + word)
            if len(full) <= len(base) or full[: len(base)] != base:
                raise ConfigError(
                    f"{self.guard}: the tokenizer of {self.model_name} merges the answer "
                    f"{word!r} with the prompt, so it cannot be scored as a next token"
                )
            found.append(full[len(base)])
        if len(set(found)) != len(found):
            raise ConfigError(
                f"{self.guard}: the answers {list(words)} start with the same token in the "
                f"tokenizer of {self.model_name}"
            )
        result = tuple(found)
        self._continuations[key] = result
        return result

    # -- inference (worker thread) -----------------------------------------------------------

    def _batch_tensors(self, tokenizer: Any, prompts: Sequence[str]) -> tuple[Any, Any]:
        import torch

        encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
        if any(not ids for ids in encoded):
            raise GuardError(f"{self.guard}: empty prompt")
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
        return input_ids.to(self._device), mask.to(self._device)

    def score_batch(
        self, items: Sequence[tuple[str, tuple[int, ...]]]
    ) -> list[tuple[float, ...]]:
        """For each ``(prompt, token ids)``: the probability (full softmax) of each token id as
        the next token after the prompt. One forward pass for the whole batch."""
        import torch

        model, tokenizer = self._loaded()
        with self._run_lock:
            input_ids, mask = self._batch_tensors(tokenizer, [prompt for prompt, _ in items])
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keeps_logits else {}
            with torch.inference_mode():
                logits = model(
                    input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                    use_cache=False, **kwargs,
                ).logits[:, -1, :]
                probabilities = torch.softmax(logits.float(), dim=-1).cpu()
        return [tuple(float(p) for p in probabilities[row, list(ids)].tolist())
                for row, (_, ids) in enumerate(items)]

    def generate_batch(
        self, prompts: Sequence[str], max_new_tokens: int, watch: Sequence[int] = ()
    ) -> list[Generated]:
        return self._generate_requests(
            [_GenerateRequest(prompt, max_new_tokens, tuple(watch)) for prompt in prompts]
        )

    def _generate_requests(self, requests: Sequence[_GenerateRequest]) -> list[Generated]:
        import torch
        from transformers import GenerationConfig

        model, tokenizer = self._loaded()
        steps = max(request.max_new_tokens for request in requests)
        # A fresh config: the model's own may ask for sampling (temperature, top_p), and a guard's
        # verdict must be the greedy reading.
        config = cast(Any, GenerationConfig)(
            max_new_tokens=steps, do_sample=False, pad_token_id=self._pad_id,
            eos_token_id=list(self._eos_ids) or None,
        )
        with self._run_lock:
            input_ids, mask = self._batch_tensors(tokenizer, [r.prompt for r in requests])
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids, attention_mask=mask, generation_config=config,
                    return_dict_in_generate=True, output_logits=True,
                )
            new_tokens = out.sequences[:, input_ids.shape[1]:].cpu()
            step_logits = [logits.float().cpu() for logits in out.logits]
        results: list[Generated] = []
        for row, request in enumerate(requests):
            ids: list[int] = []
            watched: list[tuple[float, ...]] = []
            for step in range(min(request.max_new_tokens, new_tokens.shape[1])):
                token = int(new_tokens[row, step])
                if token in self._eos_ids:
                    break
                ids.append(token)
                if request.watch:
                    probabilities = torch.softmax(step_logits[step][row], dim=-1)
                    watched.append(tuple(float(probabilities[i]) for i in request.watch))
            text = str(tokenizer.decode(ids, skip_special_tokens=True))
            results.append(Generated(text, tuple(ids), tuple(watched)))
        return results

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # -- the event loop side ----------------------------------------------------------------------

    async def score(self, prompt: str, token_ids: tuple[int, ...]) -> tuple[float, ...]:
        """``score_batch`` for one prompt, sharing a forward pass with concurrent callers."""
        return await self._scorer.submit((prompt, token_ids))

    async def generate(
        self, prompt: str, max_new_tokens: int, watch: Sequence[int] = ()
    ) -> Generated:
        """A greedy continuation, batched with concurrent callers."""
        return await self._generator.submit(_GenerateRequest(prompt, max_new_tokens, tuple(watch)))


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """A Hugging Face tokenizer's special tokens, and its other added tokens that its chat
    template writes (see ``HFRunner.special_tokens``)."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    found = [str(token.content) for token in tokenizer.added_tokens_decoder.values()
             if token.special or str(token.content) in template]
    found += [str(token) for token in tokenizer.all_special_tokens]
    return tuple(dict.fromkeys(found))
