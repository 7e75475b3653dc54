"""Re-benchmarking: ``guardrail eval`` and ``guardrail eval compare``."""
