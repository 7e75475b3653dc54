"""Guards registered by name (``guard.kind``); what each module of this package is:

- ``base``: the Guard protocol (``Guard``, ``GuardView``, ``Verdict``, ``check_each``);
  ``capabilities``: the optional ones (warm-up, request judging, stats) and their helpers.
- Registered guards: ``none`` (``passthrough``), ``embedded`` (a local CPU guard, the default),
  the generative families ``llama-guard``, ``qwen3guard``, ``wildguard``, ``granite-guardian``
  and ``shieldgemma`` (``generative/``: each family once, on any runner chosen by
  ``guard.runner``: transformers in-process, an OpenAI-compatible endpoint at ``guard.url``, or
  vLLM; ``vllm`` is the older kind for the last), ``llm-judge`` (any model through LiteLLM) and
  ``cascade`` (a cheap guard first, a model guard for uncertain scores).
- ``plumbing/``: what guards are built from (micro-batching, neutralising judged text, the
  compliance-cue wrapper ``build_guard`` adds, the stats collector).
"""

from __future__ import annotations

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError
from guardrail.guards.base import SAFE, Guard, GuardView, Verdict, check_each
from guardrail.guards.generative.families import FAMILIES
from guardrail.registry import Registry

GUARDS: Registry[Guard] = Registry("guard")
GUARDS.register_lazy("none", "guardrail.guards.passthrough:PassThroughGuard")
GUARDS.register_lazy("embedded", "guardrail.guards.embedded:EmbeddedGuard")
GENERATIVE_KINDS = (*FAMILIES.names(), "vllm")
"""Every family by its name, and ``vllm`` (a family named by ``options.format``, on vLLM)."""
for _kind in GENERATIVE_KINDS:
    GUARDS.register_lazy(_kind, "guardrail.guards.generative:create_generative")
GUARDS.register_lazy("llm-judge", "guardrail.guards.llm_judge:LLMJudgeGuard")
GUARDS.register_lazy("cascade", "guardrail.guards.cascade:CascadeGuard")


def create_guard(config: GuardConfig) -> Guard:
    """The backend ``guard.kind`` names, as configured (a cascade builds its stages with this)."""
    if config.runner != "auto" and config.kind not in GENERATIVE_KINDS:
        raise ConfigError(f"guard.runner: only the generative guards take a runner "
                          f"({', '.join(GENERATIVE_KINDS)}); {config.kind} runs as it is")
    return GUARDS.create(config.kind, config)


def build_guard(config: GuardConfig) -> Guard:
    """The guard the proxy uses: the backend, with the compliance-cue check around it unless
    ``guard.compliance_cues`` is off."""
    guard = create_guard(config)
    if config.compliance_cues and config.kind != "none":
        from guardrail.guards.plumbing.cues import ComplianceCueGuard

        return ComplianceCueGuard(guard)
    return guard


__all__ = ["GUARDS", "SAFE", "Guard", "GuardView", "Verdict", "build_guard", "check_each",
           "create_guard"]
