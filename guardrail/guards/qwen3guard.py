"""``guard.kind: qwen3guard``: Qwen3Guard-Gen (0.6B, 4B, 8B), in-process or over an endpoint.

``guard.options.controversial``: ``strict`` (default) counts the model's ``Controversial`` as
unsafe, ``loose`` as safe; the score follows (P(Unsafe) + P(Controversial), or P(Unsafe) alone).

In-process: the prompt (the tokenizer's chat template, ``render_prompt`` without one) is followed
by ``Safety:``, which the model always writes first, and one forward pass gives the probabilities
of `` Unsafe``, `` Controversial`` and `` Safe`` as the next token. A flagged step then pays for
a short continuation that writes its categories (and, for a response, the refusal line).

Endpoint (``guard.url``, e.g. ``vllm serve Qwen/Qwen3Guard-Gen-4B``): one chat request per check;
the server applies the template, the answer is parsed and scored from the severity word's
logprobs.
"""

from __future__ import annotations

from guardrail.config import GuardConfig
from guardrail.guards.base import Guard, GuardView
from guardrail.guards.chat_endpoint import answer_probabilities
from guardrail.guards.generative_base import (
    EndpointGuard,
    LocalGuard,
    Reading,
    chat_messages,
    choice_option,
)
from guardrail.guards.qwen3guard_format import (
    DEFAULT_MODEL,
    MARKERS,
    MODES,
    SEVERITIES,
    counts_as_unsafe,
    parse_output,
    render_prompt,
    unsafe_probability,
)

OPTIONS = ("controversial",)
ANSWER_TOKENS = 32
"""Room for the three answer lines; the model stops by itself before."""


def create_qwen3guard(config: GuardConfig) -> Guard:
    """The endpoint variant when ``guard.url`` is set, the in-process one otherwise."""
    if config.url:
        return Qwen3GuardEndpoint(config)
    return Qwen3GuardLocal(config)


def _extra(severity: str, refusal: bool | None, mode: str) -> dict[str, str]:
    extra = {"severity": severity, "controversial": mode}
    if refusal is not None:
        extra["refusal"] = "yes" if refusal else "no"
    return extra


class Qwen3GuardLocal(LocalGuard):
    name = "qwen3guard"
    options = OPTIONS

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config, default_model=DEFAULT_MODEL, markers=MARKERS)
        self.mode = choice_option(config.options, "controversial", MODES, "strict")

    def prompt(self, view: GuardView) -> str:
        """The exact text the model reads for ``view``, up to where it writes ``Safety:``."""
        messages = chat_messages(view, self.neutralise)
        rendered = self.runner.render_chat(messages, add_generation_prompt=False)
        if rendered is not None and not rendered.rstrip().endswith(("</think>", "assistant")):
            # A template that leaves the assistant header to add_generation_prompt.
            rendered = self.runner.render_chat(messages, add_generation_prompt=True)
        return rendered if rendered is not None else render_prompt(messages)

    async def _read(self, view: GuardView) -> Reading:
        prompt = self.prompt(view) + "Safety:"
        ids = self.runner.continuation_ids(prompt, [" " + word for word in SEVERITIES])
        raw = await self.runner.score(prompt, ids)
        total = sum(raw)
        probabilities = {word: (p / total if total > 0 else 1 / len(raw))
                         for word, p in zip(SEVERITIES, raw, strict=True)}
        severity = max(SEVERITIES, key=lambda word: probabilities[word])
        score = unsafe_probability(probabilities, self.mode)
        text_unsafe = counts_as_unsafe(severity, self.mode)
        categories: tuple[str, ...] = ()
        refusal: bool | None = None
        answer = f"Safety: {severity}"
        if score >= self.config.threshold:
            # The flagged severity the categories belong to: the likelier of the unsafe ones.
            flagged = severity if severity != "Safe" else (
                "Unsafe" if self.mode == "loose"
                or probabilities["Unsafe"] >= probabilities["Controversial"] else "Controversial"
            )
            head = f"Safety: {flagged}\nCategories:"
            continuation = await self.runner.generate(prompt[: -len("Safety:")] + head,
                                                      ANSWER_TOKENS)
            answer = head + continuation.text
            parsed = parse_output(answer)
            categories, refusal = parsed.categories, parsed.refusal
        extra = _extra(severity, refusal, self.mode)
        extra.update({f"p_{word.lower()}": f"{probabilities[word]:.4f}" for word in SEVERITIES})
        return Reading(text_unsafe=text_unsafe, score=score, categories=categories, raw=answer,
                       score_source="logits", extra=extra)


class Qwen3GuardEndpoint(EndpointGuard):
    name = "qwen3guard"
    options = OPTIONS

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config, default_model=DEFAULT_MODEL, markers=MARKERS)
        self.mode = choice_option(config.options, "controversial", MODES, "strict")

    async def _read(self, view: GuardView) -> Reading:
        completion = await self.endpoint.chat(chat_messages(view, self.neutralise),
                                              max_tokens=ANSWER_TOKENS)
        parsed = parse_output(completion.text)
        probabilities = answer_probabilities(completion, parsed.severity_at, SEVERITIES)
        return Reading(
            text_unsafe=counts_as_unsafe(parsed.severity, self.mode),
            score=None if probabilities is None else unsafe_probability(probabilities, self.mode),
            categories=parsed.categories,
            raw=completion.text,
            score_source="logprobs",
            extra=_extra(parsed.severity, parsed.refusal, self.mode),
        )
