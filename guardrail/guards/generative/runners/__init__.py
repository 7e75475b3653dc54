"""How a generative guard's model is run, registered by name (``guard.runner``).

``transformers`` (in-process, next-token probabilities), ``endpoint`` (an OpenAI-compatible
server at ``guard.url``) and ``vllm`` (an in-process vLLM engine). The last two are text runners
(``runners.text.TextRunner``): they answer completions with logprobs, so every family reads them
the same way.
"""

from __future__ import annotations

from typing import Protocol

from guardrail.registry import Registry


class Runner(Protocol):
    """What every runner offers the guard around it."""

    @property
    def name(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def option_keys(self) -> tuple[str, ...]:
        """The ``guard.options`` keys this runner reads."""

    def load(self) -> None:
        """Load the model now (blocking; called in a worker thread). Safe to call again."""

    def special_tokens(self) -> tuple[str, ...]:
        """The tokenizer's control tokens, once loaded, so that judged text cannot produce them
        (empty where the tokenizer is not here)."""

    async def aclose(self) -> None: ...


RUNNERS: Registry[Runner] = Registry("guard runner")
_MODULE = "guardrail.guards.generative.runners"
RUNNERS.register_lazy("transformers", f"{_MODULE}.transformers:HFRunner.from_config")
RUNNERS.register_lazy("endpoint", f"{_MODULE}.endpoint:GuardEndpoint")
RUNNERS.register_lazy("vllm", f"{_MODULE}.vllm:VLLMRunner")

__all__ = ["RUNNERS", "Runner"]
