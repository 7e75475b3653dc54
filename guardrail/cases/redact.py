"""Blanking case fields before they are stored (``store.redact``), for deployments that may keep
the verdicts and timings but not what users and the model wrote.

Only text is blanked: step indexes, verdicts, categories, scores and timings stay, so metrics and
the flagged-step positions survive redaction; a harvest of redacted cases has no text to learn from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from guardrail.cases.model import Case


def _blank_messages(request: dict[str, Any]) -> dict[str, Any]:
    messages = request.get("messages")
    if not isinstance(messages, list):
        return request
    # Roles and the number of turns stay: they are shape, not content.
    blanked = [_blank_message(message) if isinstance(message, dict) else message
               for message in messages]
    return {**request, "messages": blanked}


def _blank_message(message: dict[str, Any]) -> dict[str, Any]:
    blanked = {**message, "content": ""}
    calls = message.get("tool_calls")
    if isinstance(calls, list):  # an assistant turn's calls: their arguments are content
        blanked["tool_calls"] = _blank_arguments(calls)
    return blanked


def _blank_arguments(calls: list[Any]) -> list[Any]:
    # The tool's name and the call's id stay (shape); the arguments are what the model wrote.
    return [{**call, "function": {**call["function"], "arguments": ""}}
            if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
            for call in calls]


def _redact_request(case: Case) -> dict[str, Any]:
    return {"request": {}}


def _redact_messages(case: Case) -> dict[str, Any]:
    return {"request": _blank_messages(case.request)}


def _steps(field: str) -> Callable[[Case], dict[str, Any]]:
    def apply(case: Case) -> dict[str, Any]:
        blank: Any = "" if field == "text" else None
        return {"steps": [step.model_copy(update={field: blank}) for step in case.steps]}
    return apply


def _corrections(field: str) -> Callable[[Case], dict[str, Any]]:
    def apply(case: Case) -> dict[str, Any]:
        return {"corrections": [correction.model_copy(update={field: ""})
                                for correction in case.corrections]}
    return apply


def _text(field: str) -> Callable[[Case], dict[str, Any]]:
    def apply(case: Case) -> dict[str, Any]:
        return {field: ""}
    return apply


def _redact_tool_arguments(case: Case) -> dict[str, Any]:
    return {"tool_calls": _blank_arguments(case.tool_calls)}


REDACTABLE: dict[str, Callable[[Case], dict[str, Any]]] = {
    "request": _redact_request,
    "request.messages": _redact_messages,
    "steps.text": _steps("text"),
    "steps.raw": _steps("raw"),
    "withheld": _text("withheld"),
    "client_reasoning": _text("client_reasoning"),
    "client_content": _text("client_content"),
    "tool_calls.arguments": _redact_tool_arguments,
    "corrections.withheld": _corrections("withheld"),
    "corrections.inserted": _corrections("inserted"),
    "corrections.continuation": _corrections("continuation"),
}
"""Every name ``store.redact`` accepts, and how each is blanked (``request`` drops the whole
body; ``request.messages`` keeps the parameters and roles but empties each message)."""


def redact(case: Case, fields: Iterable[str]) -> Case:
    """A copy of ``case`` with ``fields`` blanked; ``case`` itself is left as it was.

    Unknown names raise ``KeyError``: config validation rejects them first, so one here is a bug.
    """
    redacted = case
    for name in fields:
        # Applied one at a time so that "request" and "request.messages" compose.
        redacted = redacted.model_copy(update=REDACTABLE[name](redacted))
    return redacted
