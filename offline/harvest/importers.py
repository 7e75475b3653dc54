"""Public safety-reasoning sets in the UnsafeChain record form, to mix with a team's harvest.

- ``unsafechain``: ``raj-tomar001/UnSafeChain`` (configs ``full``, ``random``, ``selected``;
  ``prompt``, ``response``): corrected completions, so ``correction="rewrite"``;
- ``star1``: STAR-1 (``UCSC-VLAA/STAR-1``; ``question``, ``response``, ``category`` list,
  ``id``), safe responses written to policy;
- ``safechain``: ``UWNSL/SafeChain`` (gated on the hub; ``instruction``, ``response``), whose
  responses carry no opening ``<think>`` (R1 style: ``reasoning</think>answer``).

Each loads from the hub by its dataset id (through ``datasets``) or from a local file
(``.json`` array, ``.jsonl``, ``.csv`` or ``.parquet``). Responses with think tags, complete
or only closing, are rewritten in the canonical ``<think>\\n...\\n</think>\\n\\n...`` form;
untagged ones are kept verbatim (``untagged="keep"``) or dropped and counted (``"drop"``).
Every record gets ``source`` = the set's name; rows without a prompt or a response are counted,
never silently lost.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from guardrail.errors import GuardrailError
from offline.harvest.funnel import FilterResult
from offline.harvest.records import Correction, UnsafeChainRecord, format_response, split_response

Untagged = Literal["keep", "drop"]


class PublicSetError(GuardrailError):
    """A public set could not be read; the message says which and why."""

    code = "import_failed"


@dataclass(frozen=True, slots=True)
class PublicSet:
    name: str
    hub_id: str
    hub_config: str | None
    split: str
    prompt_columns: tuple[str, ...]
    response_columns: tuple[str, ...]
    correction: Correction
    licence: str


PUBLIC_SETS: dict[str, PublicSet] = {entry.name: entry for entry in (
    PublicSet("unsafechain", "raj-tomar001/UnSafeChain", "full", "train", ("prompt",),
              ("response",), "rewrite", "see the dataset card"),
    PublicSet("star1", "UCSC-VLAA/STAR-1", None, "train", ("question", "prompt"),
              ("response",), "none", "Apache-2.0"),
    PublicSet("safechain", "UWNSL/SafeChain", None, "train", ("instruction", "prompt"),
              ("response",), "none", "see the dataset card"),
)}


def _first_text(row: Mapping[str, Any], columns: Iterable[str]) -> str:
    for column in columns:
        value = row.get(column)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def _category(value: Any) -> str | None:
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or None
    return str(value) if value not in (None, "") else None


def convert(rows: Iterable[Mapping[str, Any]], public_set: PublicSet, *,
            untagged: Untagged = "keep") -> FilterResult[UnsafeChainRecord]:
    """Rows of a public set as records (see the module docstring)."""
    result: FilterResult[UnsafeChainRecord] = FilterResult(f"import:{public_set.name}", [])
    tagged_count = untagged_count = 0
    for row in rows:
        if not isinstance(row, Mapping):
            result.removed["not_an_object"] += 1
            continue
        prompt = _first_text(row, public_set.prompt_columns)
        response = _first_text(row, public_set.response_columns)
        if not prompt:
            result.removed["no_prompt"] += 1
            continue
        if not response:
            result.removed["no_response"] += 1
            continue
        parsed = split_response(response)
        if parsed.tagged:
            tagged_count += 1
            if not parsed.answer:
                result.removed["no_answer"] += 1
                continue
            response = format_response(parsed.reasoning, parsed.answer)
        else:
            untagged_count += 1
            if untagged == "drop":
                result.removed["untagged"] += 1
                continue
            response = response.strip()
        identifier = row.get("id")
        result.kept.append(UnsafeChainRecord(
            prompt=prompt, response=response, category=_category(row.get("category")),
            correction=public_set.correction,
            case_id=None if identifier is None else str(identifier),
            source=public_set.name))
    result.details = {"tagged": tagged_count, "untagged": untagged_count,
                      "untagged_policy": untagged, "licence": public_set.licence}
    return result


def read_local(path: Path) -> list[dict[str, Any]]:
    """Rows of a local copy: a JSON array, JSON lines, CSV or Parquet."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as parquet

            rows: list[dict[str, Any]] = parquet.read_table(path).to_pylist()
            return rows
        if path.suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as handle:
                return list(csv.DictReader(handle))
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PublicSetError(f"{path}: cannot read ({error})") from error
    if isinstance(data, dict):
        # Some copies wrap the rows: {"data": [...]} or {"train": [...]}.
        data = next((value for value in data.values() if isinstance(value, list)), None)
    if not isinstance(data, list):
        raise PublicSetError(f"{path}: expected a JSON array of objects, or JSON lines")
    return data


def read_hub(public_set: PublicSet, config: str | None = None) -> Iterable[Mapping[str, Any]]:
    try:
        import datasets
    except ImportError as error:
        raise PublicSetError("importing from the hub needs `datasets` "
                           "(pip install 'reasoning-guardrail[offline]')") from error
    try:
        data: Iterable[Mapping[str, Any]] = datasets.load_dataset(
            public_set.hub_id, config or public_set.hub_config, split=public_set.split)
    except Exception as error:  # datasets raises many kinds (offline, gated, missing)
        first = str(error).splitlines()[0] if str(error) else ""
        raise PublicSetError(f"{public_set.name}: cannot load {public_set.hub_id} from the hub "
                           f"({type(error).__name__}: {first}); give a local file "
                           "instead") from error
    return data


def import_public_set(name: str, path: Path | None = None, *, config: str | None = None,
                      untagged: Untagged = "keep") -> FilterResult[UnsafeChainRecord]:
    """The set ``name`` from ``path`` when given, else from the hub (``config`` overrides the
    default hub config, e.g. ``selected`` for UnsafeChain's 1K subset)."""
    if name not in PUBLIC_SETS:
        raise PublicSetError(f"unknown public set {name!r}; known: {sorted(PUBLIC_SETS)}")
    public_set = PUBLIC_SETS[name]
    if path is not None:
        if not path.is_file():
            raise PublicSetError(f"{path}: no such file")
        rows: Iterable[Mapping[str, Any]] = read_local(path)
    else:
        rows = read_hub(public_set, config)
    return convert(rows, public_set, untagged=untagged)
