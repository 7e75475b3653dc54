"""Training data for SFT: files (or folders of ``*.jsonl``) mixed by ratio, every row accounted for.

The ``--data`` entries are parsed by offline/train/data_spec.py, as DPO's are. A file holds
UnsafeChain records (``prompt`` + ``response``, rendered by offline/train/render.py) or rows
already in TRL's prompt-completion form. Rows that cannot be used are skipped with their line
and reason; rendered rows longer than ``max_length`` tokens are dropped and counted, never cut
(a cut would train on a reasoning trace without its answer). A ratio scales a file's kept rows
(:func:`scaled`, which DPO's pair files use too). :func:`scan` checks the shape with no
tokenizer, so bad data fails before any load.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offline.harvest.records import BadRow, read_jsonl
from offline.train.data_spec import DataError, DataSpec, expand, parse_specs
from offline.train.render import ChatTokenizer, sft_rows

__all__ = ["NEITHER", "DataError", "FileCard", "Mixture", "build", "scaled", "scan"]

NEITHER = "neither UnsafeChain fields (prompt, response) nor prompt/completion fields"


@dataclass(slots=True)
class FileCard:
    """What one file gave: rows read, used, skipped and dropped with their reasons."""

    path: str
    ratio: float
    form: str
    rows: int = 0
    kept: int = 0
    used: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ratio": self.ratio, "form": self.form, "rows": self.rows,
                "kept": self.kept, "used": self.used, "skipped": dict(self.skipped),
                "dropped": dict(self.dropped)}


@dataclass(slots=True)
class Mixture:
    rows: list[dict[str, str]]
    cards: list[FileCard]

    @property
    def dropped(self) -> int:
        return sum(sum(card.dropped.values()) for card in self.cards)

    @property
    def skipped(self) -> int:
        return sum(sum(card.skipped.values()) for card in self.cards)


def _form(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    if "prompt" in value and "response" in value:
        return "unsafechain"
    if isinstance(value.get("prompt"), str) and isinstance(value.get("completion"), str):
        return "prompt-completion"
    return None


def _first_row(path: Path) -> tuple[int, Any] | None:
    """The first JSON row of ``path`` and its line, skipping lines that are not JSON."""
    try:
        for row in read_jsonl(path):
            if not isinstance(row, BadRow):
                return row
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read it ({error})") from None
    return None


def _first_form(path: Path) -> str | None:
    first = _first_row(path)
    if first is None:
        return None
    line, value = first
    form = _form(value)
    if form is None:
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise DataError(f"{path}:{line}: {NEITHER} (found {keys})")
    return form


def _sft_file(path: Path) -> bool:
    """Whether a file in a folder is SFT data (an empty one is, and fails in ``scan``)."""
    first = _first_row(path)
    return first is None or _form(first[1]) is not None


def scan(specs: list[Any]) -> list[tuple[DataSpec, str]]:
    """Each file with its form, from its first JSON row; a file of another shape is an error."""
    found: list[tuple[DataSpec, str]] = []
    for spec in parse_specs(specs):
        for source in expand(spec, _sft_file):
            form = _first_form(source.path)
            if form is None:
                raise DataError(f"{source.path}: no JSON rows to train on")
            found.append((source, form))
    return found


def _length(tokenizer: Any, row: dict[str, str]) -> int:
    return len(tokenizer(text=row["prompt"] + row["completion"])["input_ids"])


def _plain_rows(path: Path, card: FileCard) -> list[dict[str, str]]:
    rows = []
    for row in read_jsonl(path):
        card.rows += 1
        if isinstance(row, BadRow):
            card.skipped[row.problem] += 1
        elif _form(row[1]) != "prompt-completion":
            card.skipped["not a prompt/completion row"] += 1
        else:
            rows.append({"prompt": row[1]["prompt"], "completion": row[1]["completion"]})
    return rows


def scaled(rows: list[dict[str, str]], ratio: float, rng: random.Random) -> list[dict[str, str]]:
    """``rows`` at ``ratio``: whole copies for its integer part, a seeded sample for the rest
    (what SFT's mixtures and DPO's pair files both use)."""
    whole, part = divmod(ratio, 1.0)
    out = rows * int(whole)
    out += rng.sample(rows, round(part * len(rows)))
    return out


def build(sources: list[tuple[DataSpec, str]], tokenizer: ChatTokenizer, max_length: int,
          seed: int) -> Mixture:
    rng = random.Random(seed)
    mixed: list[dict[str, str]] = []
    cards = []
    for source, form in sources:
        card = FileCard(str(source.path), source.ratio, form)
        if form == "unsafechain":
            read = list(read_jsonl(source.path))
            card.rows = len(read)
            rendered = sft_rows(read, tokenizer)
            for bad in rendered.skipped:
                card.skipped[bad.problem] += 1
            rows = rendered.rows
        else:
            rows = _plain_rows(source.path, card)
        kept = []
        for row in rows:
            if _length(tokenizer, row) > max_length:
                card.dropped[f"longer than max_length ({max_length} tokens)"] += 1
            else:
                kept.append(row)
        card.kept = len(kept)
        used = scaled(kept, source.ratio, rng)
        card.used = len(used)
        mixed += used
        cards.append(card)
    rng.shuffle(mixed)
    return Mixture(mixed, cards)
