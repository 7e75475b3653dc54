"""Guards registered by name: ``none``, ``llama-guard`` (an OpenAI-compatible endpoint serving
Llama Guard 3, e.g. vLLM), ``embedded`` (a local CPU guard, the default)."""

from __future__ import annotations

from guardrail.config import GuardConfig
from guardrail.guards.base import SAFE, Guard, GuardView, Verdict
from guardrail.registry import Registry

GUARDS: Registry[Guard] = Registry("guard")
GUARDS.register_lazy("none", "guardrail.guards.passthrough:PassThroughGuard")
GUARDS.register_lazy("llama-guard", "guardrail.guards.llama_guard_endpoint:LlamaGuardEndpoint")
GUARDS.register_lazy("embedded", "guardrail.guards.embedded:EmbeddedGuard")


def build_guard(config: GuardConfig) -> Guard:
    return GUARDS.create(config.kind, config)


__all__ = ["GUARDS", "SAFE", "Guard", "GuardView", "Verdict", "build_guard"]
