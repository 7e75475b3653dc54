"""Guards registered by name.

``none``, ``embedded`` (a local CPU guard, the default), ``llama-guard`` (an OpenAI-compatible
endpoint serving Llama Guard 3, e.g. vLLM, with ``guard.url``; in-process with transformers
without it), ``qwen3guard``, ``wildguard``, ``granite-guardian``, ``shieldgemma``, ``llm-judge``
(any model through LiteLLM), ``vllm`` (an in-process vLLM engine; optional extra) and ``cascade``
(a cheap guard first, a model guard for uncertain scores).
"""

from __future__ import annotations

from guardrail.config import GuardConfig
from guardrail.guards.base import SAFE, Guard, GuardView, Verdict
from guardrail.registry import Registry

GUARDS: Registry[Guard] = Registry("guard")
GUARDS.register_lazy("none", "guardrail.guards.passthrough:PassThroughGuard")
GUARDS.register_lazy("llama-guard", "guardrail.guards.llama_guard:create_llama_guard")
GUARDS.register_lazy("embedded", "guardrail.guards.embedded:EmbeddedGuard")
GUARDS.register_lazy("qwen3guard", "guardrail.guards.qwen3guard:create_qwen3guard")
GUARDS.register_lazy("wildguard", "guardrail.guards.wildguard:create_wildguard")
GUARDS.register_lazy(
    "granite-guardian", "guardrail.guards.granite_guardian:create_granite_guardian"
)
GUARDS.register_lazy("shieldgemma", "guardrail.guards.shieldgemma:create_shieldgemma")
GUARDS.register_lazy("llm-judge", "guardrail.guards.llm_judge:LLMJudgeGuard")
GUARDS.register_lazy("vllm", "guardrail.guards.vllm_engine:VLLMGuard")
GUARDS.register_lazy("cascade", "guardrail.guards.cascade:CascadeGuard")


def build_guard(config: GuardConfig) -> Guard:
    guard = GUARDS.create(config.kind, config)
    if config.compliance_cues and config.kind != "none":
        from guardrail.guards.cues import ComplianceCueGuard

        return ComplianceCueGuard(guard)
    return guard


__all__ = ["GUARDS", "SAFE", "Guard", "GuardView", "Verdict", "build_guard"]
