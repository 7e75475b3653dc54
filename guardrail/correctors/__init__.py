"""Correctors registered by name: ``refuse``, ``block``, ``intervene`` (cut, safety trigger,
the same model goes on) and ``rewrite`` (a corrector model writes the rest)."""

from __future__ import annotations

from guardrail.config import CorrectionConfig
from guardrail.correctors.base import CorrectionContext, CorrectionPlan, Corrector
from guardrail.registry import Registry

CORRECTORS: Registry[Corrector] = Registry("correction strategy")
CORRECTORS.register_lazy("refuse", "guardrail.correctors.simple:RefuseCorrector")
CORRECTORS.register_lazy("block", "guardrail.correctors.simple:BlockCorrector")
CORRECTORS.register_lazy("intervene", "guardrail.correctors.intervene:InterveneCorrector")
CORRECTORS.register_lazy("rewrite", "guardrail.correctors.rewrite:RewriteCorrector")


def build_corrector(config: CorrectionConfig) -> Corrector:
    return CORRECTORS.create(config.strategy, config)


__all__ = ["CORRECTORS", "CorrectionContext", "CorrectionPlan", "Corrector", "build_corrector"]
