"""The correction step's cache: every model response, keyed by a hash of its request.

An append-only JSON-lines file beside the output, one line per finished call, flushed as it is
written: a restarted ``guardrail correct`` reads it and calls the model only for requests it
does not hold, so a crash or a Ctrl-C costs at most the calls in flight. A torn last line (a
crash mid-write) is skipped and counted; the next write starts on a fresh line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any


def request_key(request: dict[str, Any]) -> str:
    """The content hash of a request (model, messages and sampling settings)."""
    canonical = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedResponse:
    key: str
    content: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None


class ResponseCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, CachedResponse] = {}
        self.unreadable_lines = 0
        self._handle: IO[str] | None = None
        if path.is_file():
            self._load()

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    entry = CachedResponse(**json.loads(line))
                except (ValueError, TypeError):
                    self.unreadable_lines += 1
                    continue
                self.entries[entry.key] = entry

    def get(self, key: str) -> CachedResponse | None:
        return self.entries.get(key)

    def put(self, entry: CachedResponse) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = _ends_torn(self.path)
            self._handle = self.path.open("a", encoding="utf-8")
            if torn:
                self._handle.write("\n")
        self._handle.write(json.dumps(asdict(entry), ensure_ascii=False) + "\n")
        self._handle.flush()
        self.entries[entry.key] = entry

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _ends_torn(path: Path) -> bool:
    """True when the file's last line has no newline (a write cut short)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) != b"\n"
