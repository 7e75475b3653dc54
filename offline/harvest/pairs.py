"""IPO preference pairs, in the form TRL's DPOTrainer takes without losing the shared prefix.

An IPO pair (Zhang et al. 2025) shares everything before the first compliance cue: the request
and the safe start of the reasoning (``prefix``). ``chosen`` is the safety trigger + the safe
continuation (+ ``</think>`` and the answer); ``rejected`` is what the model originally wrote
from the cue on. The paper puts the preference loss on the diverging suffix only (on the whole
trajectory it was worse: 19.0 vs 10.9 harmful %).

How that maps onto TRL (dataset formats, "preference" type): DPOTrainer takes ``prompt`` /
``chosen`` / ``rejected`` in either the *standard* form (strings) or the *conversational* form
(lists of ``{"role", "content"}``). It tokenizes ``prompt``, ``prompt + chosen`` and
``prompt + rejected`` and puts the loss on the completion tokens only. In the conversational form
the assistant's partial turn would go through the chat template, and R1-distill templates delete
everything up to ``</think>`` from assistant turns: the prefix would be lost. So the rows here are
in the **standard** form:

- ``prompt`` = the chat template rendered for the user's request with the generation prompt,
  ending in ``<think>\\n``, followed by the shared safe reasoning ``prefix``; so the loss falls
  on ``chosen`` / ``rejected`` only, the diverging suffix;
- ``chosen`` / ``rejected`` = the two suffixes as raw text (DPOTrainer appends EOS itself);
- ``prefix`` (the shared reasoning) and ``request`` (the user's text) are kept as extra columns
  for provenance; DPOTrainer ignores columns it does not use.

Tokens: the rendered prompt carries the template's BOS text, as the model saw it online. TRL
1.16's DPOTrainer tokenizes ``prompt``, ``chosen`` and ``rejected`` apart with the tokenizer's
defaults, so a tokenizer that adds BOS itself would see two: ``offline.train.render.dpo_row``
takes the BOS text out of the prompt for such a tokenizer when the pairs are loaded for training.
Because the pieces are tokenized apart, whitespace at the boundary moves into
the suffixes (``prompt`` ends on the prefix's last non-space character; ``chosen`` and
``rejected`` start with the gap), as in TRL's own ``"The sky is"`` / ``" blue."`` example, so the
suffix's first word gets the same leading-space token it has in the joined text.
The rendering is the proxy's own (:class:`guardrail.continuation.ChatTemplate`, the one the
``completions`` continuation uses), so training sees the text the model continued from online.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from guardrail.continuation import AssistantPrefix, ChatTemplate, load_template
from offline.harvest.records import CLOSE_THINK, RecordError

DEFAULT_TEMPLATE = "deepseek-r1-distill"
"""UnsafeChain and IPO train R1-distills; any Jinja file or known template name works."""


@dataclass(frozen=True, slots=True)
class PreferencePair:
    prompt: str
    """Rendered chat template + ``<think>\\n`` + ``prefix`` (see the module docstring)."""
    prefix: str
    chosen: str
    rejected: str
    request: str
    case_id: str | None = None
    category: str | None = None
    source: str = "proxy"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Any) -> PreferencePair:
        if not isinstance(row, dict):
            raise RecordError(f"a pair is a JSON object, not {type(row).__name__}")
        for name in ("prompt", "prefix", "chosen", "rejected", "request"):
            if not isinstance(row.get(name), str):
                raise RecordError(f"{name!r}: a string is required")
        if not row["prompt"].endswith(row["prefix"]):
            raise RecordError("'prompt' must end with 'prefix' (the shared reasoning)")
        return cls(prompt=row["prompt"], prefix=row["prefix"], chosen=row["chosen"],
                   rejected=row["rejected"], request=row["request"],
                   case_id=_optional_text(row.get("case_id")),
                   category=_optional_text(row.get("category")),
                   source=str(row.get("source", "proxy")))


def build_pair(
    request: str,
    prefix: str,
    trigger: str,
    safe_continuation: str,
    answer: str,
    original_continuation: str,
    *,
    template: ChatTemplate | str = DEFAULT_TEMPLATE,
    case_id: str | None = None,
    category: str | None = None,
    source: str = "proxy",
) -> PreferencePair:
    """The pair for one intervened case.

    ``prefix`` is the reasoning the client saw before the cut; ``trigger`` + ``safe_continuation``
    is what the proxy inserted and the model wrote after it; ``original_continuation`` is the text
    from the flagged step on: ``prefix + trigger...`` and ``prefix + original_continuation`` are
    the texts the model saw. Raises RecordError when the two sides do not diverge.
    """
    if isinstance(template, str):
        template = load_template(template)
    chosen = _join(trigger, safe_continuation)
    if answer.strip():
        chosen = f"{chosen}\n{CLOSE_THINK}\n\n{answer.strip()}"
    rejected = original_continuation
    if not chosen.strip() or not rejected.strip():
        raise RecordError("a pair needs a non-empty chosen and rejected side")
    if chosen.strip() == rejected.strip():
        raise RecordError("chosen and rejected are the same text")
    shared = prefix.rstrip()
    gap = prefix[len(shared):]  # the boundary's whitespace goes with the suffixes (see above)
    rendered = template.render_prefix([{"role": "user", "content": request}],
                                      AssistantPrefix(reasoning=shared))
    return PreferencePair(prompt=rendered, prefix=shared, chosen=gap + chosen,
                          rejected=gap + rejected, request=request, case_id=case_id,
                          category=category, source=source)


def rerender(pair: PreferencePair, template: ChatTemplate | str = DEFAULT_TEMPLATE,
             **changes: str) -> PreferencePair:
    """The pair with some texts changed (``request``, ``prefix``, ``chosen``, ``rejected``) and
    its ``prompt`` rendered again from the new request and prefix."""
    if isinstance(template, str):
        template = load_template(template)
    unknown = set(changes) - {"request", "prefix", "chosen", "rejected"}
    if unknown:
        raise ValueError(f"rerender: cannot change {sorted(unknown)}")
    request = changes.get("request", pair.request)
    prefix = changes.get("prefix", pair.prefix)
    if prefix != prefix.rstrip():
        raise ValueError("rerender: a prefix ends on non-space text (the gap is in the suffixes)")
    prompt = template.render_prefix([{"role": "user", "content": request}],
                                    AssistantPrefix(reasoning=prefix))
    return replace(pair, prompt=prompt, **changes)


def _join(first: str, second: str) -> str:
    """Trigger and continuation as the model saw them: one space unless either side has one."""
    if not first or not second or first[-1].isspace() or second[0].isspace():
        return first + second
    return f"{first} {second}"


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)
