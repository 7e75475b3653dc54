"""Moved to ``guardrail.guards.plumbing.microbatch``; kept here only for the embedded guard, which
imports it from this path until it moves into its own package."""

from guardrail.guards.plumbing.microbatch import MicroBatcher

__all__ = ["MicroBatcher"]
