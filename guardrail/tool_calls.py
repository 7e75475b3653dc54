"""Tool calls assembled from their streamed fragments, the way the OpenAI SDK assembles them.

The proxy forwards each fragment as the model sent it; this is only for what must be whole:
the non-streamed ``message.tool_calls`` and the case record.
"""

from __future__ import annotations

from typing import Any


class ToolCallAccumulator:
    """Folds ``delta.tool_calls`` fragments by ``index``: strings are concatenated (``id``,
    ``function.name``, ``function.arguments``), ``index`` and ``type`` replaced, objects merged,
    as the OpenAI SDK's stream accumulator does, so both ends agree on the result."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, fragment: dict[str, Any]) -> None:
        index = fragment.get("index")
        key = index if isinstance(index, int) else len(self._calls)
        self._calls[key] = _merge(self._calls.get(key, {}), fragment)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def calls(self) -> list[dict[str, Any]]:
        """The whole calls in index order, without ``index`` (a message's ``tool_calls``)."""
        return [{key: value for key, value in call.items() if key != "index"}
                for _, call in sorted(self._calls.items())]


def _merge(whole: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    merged = dict(whole)
    for key, value in fragment.items():
        before = merged.get(key)
        if before is None or key in ("index", "type"):
            merged[key] = value
        elif isinstance(before, str) and isinstance(value, str):
            merged[key] = before + value
        elif isinstance(before, dict) and isinstance(value, dict):
            merged[key] = _merge(before, value)
        elif value is not None:
            merged[key] = value
    return merged
