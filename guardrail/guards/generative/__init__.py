"""The generative guards: a guard model that answers in words, judged by family and run by runner.

- ``families/``: one module per model family (Llama Guard, Qwen3Guard, WildGuard, Granite
  Guardian, ShieldGemma): its prompt, the markers judged text must not imitate, its options and
  how its answer is read; registered by name in ``FAMILIES``.
- ``runners/``: how the model runs: ``transformers`` (in-process), ``endpoint`` (an
  OpenAI-compatible server) and ``vllm`` (an in-process vLLM engine); registered in ``RUNNERS``.
- ``guard``: ``GenerativeGuard`` (a family on a runner, behind the Guard protocol) and
  ``create_generative``, the one factory that ``guard.kind`` and ``guard.runner`` pick them with.

Every family works on every runner.
"""

from guardrail.guards.generative.guard import GenerativeGuard, create_generative

__all__ = ["GenerativeGuard", "create_generative"]
