"""One cached stage of the cycle: run into a work folder, renamed into place when complete.

A stage is named, has inputs (its resolved settings, the fingerprints of the files and folders
it reads, and the versions of the packages that run it) and required outputs. Its folder
``DIR/stages/NAME/`` holds ``stage.json`` (the record: inputs, their hash, the commands run,
times, the hash of ``out/``) and ``out/``. A stage whose record has the same input hash and
whose required outputs exist is skipped.

The stage runs in ``DIR/stages/NAME.work/``, which is renamed to ``NAME/`` only after its
command succeeded, its outputs were checked and its record written: a half-finished stage is
never taken as done. A work folder left by a failure is kept while its inputs stay the same, so
a command that resumes by itself (``guardrail eval``'s per-item logs, ``guardrail correct``'s
response cache) resumes; it is cleared when the inputs change.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from offline.cycle.fingerprint import digest_of, path_fingerprint

RECORD = "stage.json"
INPUTS = "inputs.json"
LOG = "log.txt"
STAGE_SCHEMA = 1


class StageFailed(Exception):
    """A stage that did not complete; the message is one line."""


@dataclass
class StageSpec:
    name: str
    inputs: dict[str, Any]
    required: tuple[str, ...] = ()
    """Paths relative to the stage folder that a complete stage holds."""


@dataclass
class StageRun:
    """What a stage's action reports: the commands it ran and a summary for the report."""

    commands: list[list[str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageOutcome:
    name: str
    status: Literal["ran", "skipped"]
    folder: Path
    record: dict[str, Any]

    @property
    def out(self) -> Path:
        return self.folder / "out"


def stages_folder(root: Path) -> Path:
    return root / "stages"


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n",
                         encoding="utf-8")
    os.replace(temporary, path)


def is_complete(folder: Path, input_hash: str, required: tuple[str, ...]) -> bool:
    record = read_record(folder)
    return (record is not None and record.get("status") == "complete"
            and record.get("input_hash") == input_hash
            and all((folder / name).exists() for name in required))


def _prepare_work(work: Path, input_hash: str, inputs: dict[str, Any]) -> None:
    """A work folder for these inputs: kept from an earlier try with the same inputs (so the
    command can resume), cleared otherwise."""
    if work.exists():
        try:
            kept = json.loads((work / INPUTS).read_text(encoding="utf-8")).get("input_hash")
        except (OSError, json.JSONDecodeError, AttributeError):
            kept = None
        if kept != input_hash:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _write_json(work / INPUTS, {"input_hash": input_hash, "inputs": inputs})


def _swap_in(work: Path, final: Path) -> None:
    """``work`` becomes ``final``; an older ``final`` is moved aside first and then removed,
    so at no moment does ``final`` hold a mixture of the two."""
    old = final.with_name(f"{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    work.rename(final)
    if old.exists():
        shutil.rmtree(old)


def run_stage(root: Path, spec: StageSpec, action: Callable[[Path], StageRun],
              *, log: Callable[[str], None] = lambda line: None) -> StageOutcome:
    """Skips the stage when it is complete for these inputs; runs ``action`` otherwise.

    ``action`` gets the work folder and writes its outputs under it (``out/`` by convention);
    it raises :class:`StageFailed` with a one-line reason."""
    folder = stages_folder(root) / spec.name
    input_hash = digest_of(spec.inputs)
    if is_complete(folder, input_hash, spec.required):
        record = read_record(folder) or {}
        log(f"{spec.name}: unchanged, skipped (finished {record.get('finished_at', '?')})")
        return StageOutcome(spec.name, "skipped", folder, record)
    work = folder.with_name(f"{spec.name}.work")
    _prepare_work(work, input_hash, spec.inputs)
    log(f"{spec.name}: running (log: {work / LOG})")
    started = time.time()
    result = action(work)
    missing = [name for name in spec.required if not (work / name).exists()]
    if missing:
        raise StageFailed(f"stage {spec.name}: finished without writing {', '.join(missing)} "
                          f"(see {work})")
    finished = time.time()
    record = {
        "schema_version": STAGE_SCHEMA,
        "name": spec.name,
        "status": "complete",
        "input_hash": input_hash,
        "inputs": spec.inputs,
        "commands": result.commands,
        "summary": result.summary,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
        "seconds": round(finished - started, 3),
        "output_hash": path_fingerprint(work / "out") if (work / "out").exists() else None,
    }
    _write_json(work / RECORD, record)
    (work / INPUTS).unlink(missing_ok=True)
    _swap_in(work, folder)
    log(f"{spec.name}: done in {record['seconds']:.1f} s")
    return StageOutcome(spec.name, "ran", folder, record)
