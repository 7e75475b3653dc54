"""Each stage runs one of the project's own commands in a child process.

A child per stage isolates memory (a model trained in one process is gone before the next one
loads another for evaluation) and gives each failure its own exit status and one-line message:
our commands print bad input as one line on stderr, and that last line is what the cycle
reports, with the log file that holds the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from guardrail.cli import COMMAND_GROUP
from offline.cycle.stage import LOG, StageFailed


def guardrail_command(*args: str) -> list[str]:
    """``guardrail ARGS`` as this interpreter runs it (the venv's, not whatever is on PATH)."""
    return [sys.executable, "-m", "guardrail.cli", *args]


def missing_commands(needed: Sequence[str]) -> list[str]:
    """Commands this install does not register (an install made before they landed)."""
    registered = {entry.name for entry in entry_points(group=COMMAND_GROUP)}
    return [name for name in needed if name not in registered]


def last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def run_command(stage: str, argv: list[str], work: Path, *,
                ok_codes: tuple[int, ...] = (0,), env: dict[str, str] | None = None) -> int:
    """Runs ``argv`` with its output appended to the stage's log; a status outside
    ``ok_codes`` is a :class:`StageFailed` naming the command's last line and the log."""
    log = work / LOG
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(argv)}\n")
        handle.flush()
        try:
            process = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=handle,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     check=False)
        except OSError as error:
            raise StageFailed(f"stage {stage}: cannot start {argv[0]} ({error.strerror})") from None
    if process.returncode not in ok_codes:
        reason = last_line(log) or "no output"
        raise StageFailed(f"stage {stage} failed (exit {process.returncode}): {reason} "
                          f"[log: {log}]")
    return process.returncode
