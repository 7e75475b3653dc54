"""Upstreams registered by name: ``openai`` (any OpenAI-compatible server: vLLM, DeepSeek),
``litellm`` (any provider LiteLLM reaches), ``demo`` (replays bundled traces)."""

from __future__ import annotations

from guardrail.config import UpstreamConfig
from guardrail.registry import Registry
from guardrail.upstreams.base import ChatRequest, Upstream

UPSTREAMS: Registry[Upstream] = Registry("upstream")
UPSTREAMS.register_lazy("openai", "guardrail.upstreams.openai_compatible:OpenAICompatibleUpstream")
UPSTREAMS.register_lazy("litellm", "guardrail.upstreams.litellm_upstream:LiteLLMUpstream")
UPSTREAMS.register_lazy("demo", "guardrail.upstreams.demo:DemoUpstream")


def build_upstream(config: UpstreamConfig) -> Upstream:
    return UPSTREAMS.create(config.resolved_kind(), config)


__all__ = ["UPSTREAMS", "ChatRequest", "Upstream", "build_upstream"]
