"""The generative guard families, registered by name (the ``guard.kind`` that picks them).

Each module holds one family whole: its prompt, the markers judged text must not imitate, its
options and how its answer is read, for every runner (``families.base.Family``).
"""

from __future__ import annotations

from guardrail.guards.generative.families.base import Exchange, Family, Reading
from guardrail.registry import Registry

FAMILIES: Registry[Family] = Registry("guard family")
_MODULE = "guardrail.guards.generative.families"
FAMILIES.register_lazy("llama-guard", f"{_MODULE}.llama_guard:LlamaGuard")
FAMILIES.register_lazy("qwen3guard", f"{_MODULE}.qwen3guard:Qwen3Guard")
FAMILIES.register_lazy("wildguard", f"{_MODULE}.wildguard:WildGuard")
FAMILIES.register_lazy("granite-guardian", f"{_MODULE}.granite_guardian:GraniteGuardian")
FAMILIES.register_lazy("shieldgemma", f"{_MODULE}.shieldgemma:ShieldGemma")

__all__ = ["FAMILIES", "Exchange", "Family", "Reading"]
