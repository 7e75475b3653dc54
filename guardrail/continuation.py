"""Continuing a cut trace: the partial assistant turn, and the ways upstreams accept it.

After an unsafe step the intervention keeps what the client already saw, appends a safety
trigger, and asks the same model to go on from there. Servers differ in how they take a partial
assistant turn:

- ``vllm``: chat completions whose last message is the partial assistant turn, with
  ``continue_final_message: true`` and ``add_generation_prompt: false``; the reasoning parser
  reports the continuation as reasoning until ``</think>``;
- ``deepseek-prefix``: DeepSeek's beta prefix mode, ``prefix: true`` on the last assistant
  message (reasoning prefix in ``reasoning_content``), served under ``/beta``;
- ``completions``: ``/v1/completions`` with the chat template rendered here;
- ``restart``: a fresh request with an introspection instruction (CARE's approach), for
  upstreams that can do none of the above.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from guardrail.errors import ConfigError, GuardrailError

ContinuationForm = Literal["vllm", "deepseek-prefix", "completions", "restart"]

OPEN_THINK = "<think>\n"
CLOSE_THINK = "\n</think>\n\n"


class ContinuationUnsupported(GuardrailError):
    """The upstream cannot continue a partial turn in the requested form."""

    code = "continuation_unsupported"


@dataclass(frozen=True, slots=True)
class AssistantPrefix:
    """What the model is asked to continue: everything the client saw, then the trigger."""

    reasoning: str
    answer: str = ""
    in_answer: bool = False
    """The cut fell in the answer: the model continues the answer, not the reasoning."""

    def as_text(self) -> str:
        """The partial assistant turn as a model with inline think tags writes it."""
        if not self.in_answer:
            return OPEN_THINK + self.reasoning
        return OPEN_THINK + self.reasoning + CLOSE_THINK + self.answer


def vllm_continuation_body(body: dict[str, Any], prefix: AssistantPrefix) -> dict[str, Any]:
    continued = dict(body)
    continued["messages"] = [*body.get("messages", []),
                             {"role": "assistant", "content": prefix.as_text()}]
    continued["continue_final_message"] = True
    continued["add_generation_prompt"] = False
    return continued


def deepseek_prefix_body(body: dict[str, Any], prefix: AssistantPrefix) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": prefix.answer, "prefix": True}
    if prefix.reasoning:
        message["reasoning_content"] = prefix.reasoning
    continued = dict(body)
    continued["messages"] = [*body.get("messages", []), message]
    return continued


def deepseek_beta_url(url: str) -> str:
    """DeepSeek serves prefix mode under ``/beta`` instead of ``/v1``."""
    base = url.rstrip("/")
    return base[: -len("/v1")] + "/beta" if base.endswith("/v1") else base + "/beta"


INTROSPECTION = (
    "Before answering, reflect on safety. An earlier draft of your reasoning for this request "
    "began to help with something harmful{categories}. Think again from the start: decline any "
    "part that could cause harm, say briefly why, and help fully with whatever is legitimate."
)


def restart_body(body: dict[str, Any], categories: tuple[str, ...]) -> dict[str, Any]:
    """CARE-style restart: the same request with an introspection instruction added."""
    named = f" ({', '.join(categories)})" if categories else ""
    note = {"role": "system", "content": INTROSPECTION.format(categories=named)}
    continued = dict(body)
    continued["messages"] = [*body.get("messages", []), note]
    return continued


# -- chat templates for the completions form ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    opens_think: bool = False
    """The generation prompt already ends with ``<think>\\n`` (R1-style templates)."""

    def render_prefix(self, messages: list[dict[str, Any]], prefix: AssistantPrefix) -> str:
        """The prompt to continue: the conversation with a generation prompt, then the turn."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        environment.globals["raise_exception"] = raise_exception
        rendered = environment.from_string(self.source).render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        turn = prefix.as_text()
        if self.opens_think:
            turn = turn.removeprefix(OPEN_THINK)
        return rendered + turn


KNOWN_TEMPLATES: dict[str, tuple[str, str, str, bool]] = {
    # name: (file, bos, eos, generation prompt opens <think>)
    "deepseek-r1-distill": (
        "deepseek-r1-distill.jinja",
        "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
        True,
    ),
    "qwen3": ("qwen3.jinja", "", "<|im_end|>", False),
}


@cache
def load_template(name_or_path: str) -> ChatTemplate:
    if name_or_path in KNOWN_TEMPLATES:
        file, bos, eos, opens_think = KNOWN_TEMPLATES[name_or_path]
        source = resources.files("guardrail.templates").joinpath(file).read_text("utf-8")
        return ChatTemplate(source, bos, eos, opens_think)
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(KNOWN_TEMPLATES))
        raise ConfigError(f"correction.chat_template: no template {name_or_path!r}; give a "
                          f"Jinja file or one of: {known}")
    source = path.read_text("utf-8")
    return ChatTemplate(source, opens_think="<think>" in source.split("add_generation_prompt")[-1])


def guess_template(model: str | None) -> str | None:
    name = (model or "").lower()
    if "r1-distill" in name or "deepseek-r1" in name:
        return "deepseek-r1-distill"
    if "qwen3" in name:
        return "qwen3"
    return None
