"""A generative guard family: its prompt, its markers, its options and how its answer is read,
written once for every runner.

The family is the model's side of the wire; the runner is how the model is run. In-process
(``runners.transformers``) a family reads next-token probabilities from one forward pass and, where
it needs them, short greedy continuations; from a text runner (``runners.endpoint``,
``runners.vllm``) it reads completions with logprobs. So a family answers two pairs of questions:

- in-process: ``prompts`` (the exact texts the model reads) and ``read_local``;
- as text: ``requests`` (what to ask for) and ``read_text`` (reading the completions).

Both give a ``Reading``: the verdict in the model's words and a probability-like score where one
can be had. The guard (``generative.guard``) decides with ``guard.threshold``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from guardrail.errors import ConfigError
from guardrail.guards.base import GuardView
from guardrail.guards.generative.runners.text import Completion, TextRequest
from guardrail.guards.generative.runners.transformers import HFRunner
from guardrail.guards.plumbing.neutralise import Markers, neutralise


@dataclass(frozen=True)
class Reading:
    text_unsafe: bool
    """The verdict in the model's words (its greedy answer)."""
    score: float | None
    """P(unsafe) in [0, 1] where the runner can give it, else None."""
    categories: tuple[str, ...] = ()
    raw: str | None = None
    """The model's answer as it wrote it, for the audit log (``Verdict.raw``)."""
    score_source: str = "verdict"
    """``logits`` (in-process), ``logprobs`` (a text runner) or ``verdict`` (text only)."""
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Exchange:
    """What a family judges: the request and the response window ending with the step, both
    neutralised against the family's markers. ``response`` is None for a prompt check (a view
    with no response text, as ``guardrail check`` sends for a prompt alone)."""

    request: str
    response: str | None

    @classmethod
    def of(cls, view: GuardView, markers: Markers) -> Exchange:
        response = view.response_text()
        return cls(neutralise(view.request, markers),
                   neutralise(response, markers) if response.strip() else None)

    @property
    def prompt_check(self) -> bool:
        return self.response is None

    def messages(self) -> list[dict[str, str]]:
        """``[user]`` for a prompt check, else ``[user, assistant]``: the conversation that the
        chat-template guards judge the last message of."""
        messages = [{"role": "user", "content": self.request}]
        if self.response is not None:
            messages.append({"role": "assistant", "content": self.response})
        return messages


class Family(ABC):
    """One guard model family. An instance holds the family's parsed ``guard.options``."""

    name: ClassVar[str]
    default_model: ClassVar[str]
    markers: ClassVar[Markers]
    """What judged text must not imitate in this family's prompt."""
    options: ClassVar[tuple[str, ...]] = ()
    """``guard.options`` keys the family reads (the runner reads its own)."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Families with options parse them here and name a bad ``guard.options.<key>``."""
        del options

    @abstractmethod
    def prompts(self, runner: HFRunner, exchange: Exchange) -> list[str]:
        """In-process: the exact texts the model reads, up to where its answer starts (one per
        policy for ShieldGemma, else one)."""

    @abstractmethod
    async def read_local(self, runner: HFRunner, exchange: Exchange,
                         threshold: float) -> Reading:
        """In-process: the reading from next-token probabilities (and, where the family needs
        one, a short greedy continuation)."""

    @abstractmethod
    def requests(self, exchange: Exchange) -> list[TextRequest]:
        """For a text runner: the completions to ask for."""

    @abstractmethod
    def read_text(self, exchange: Exchange, completions: Sequence[Completion],
                  threshold: float) -> Reading:
        """For a text runner: the reading from the answers to ``requests``, in order."""


def check_options(options: Mapping[str, Any], allowed: Collection[str], guard: str) -> None:
    """A misspelt option is a mistake the user wants to hear about, not silently ignore."""
    for key in options:
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(f"guard.options.{key}: not an option of {guard} (known: {known})")


def choice_option(
    options: Mapping[str, Any], key: str, choices: Sequence[str], default: str
) -> str:
    value = options.get(key, default)
    if value not in choices:
        raise ConfigError(f"guard.options.{key}: expected one of {', '.join(choices)}")
    return str(value)


def yes_share(p_yes: float, p_no: float) -> float:
    """P(yes) / (P(yes) + P(no)), the model cards' score of a two-word answer (0.5, undecided,
    when neither word has any probability)."""
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5
