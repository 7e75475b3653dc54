"""Whether a rerun into ``--out`` continues the run already there.

Inspect resumes by task, and its task identity leaves some of our settings out: a rerun with
another ``--limit`` reused the earlier logs and reported the earlier items as the new run, and
one with other decoding stopped with Inspect's "not associated with a task passed to eval_set".
So the settings that decide the results are kept in ``DIR/run.json`` when the run starts; a
rerun with the same ones resumes, one with others is refused in one line naming what changed.
Settings that only change how fast it runs (connections, retries, display) may differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from offline.eval.config import EvalConfig
from offline.eval.errors import EvalError

RUN_FILE = "run.json"
# What a finished item depends on. The model is the Inspect model name (``guardrail-openai/NAME``
# for an endpoint, ``guardrail-hf/PATH`` or ``vllm/PATH``), not the URL: a proxy restarted on
# another port (``guardrail cycle`` starts it on a free one) serves the same model. ``preset`` is
# left out: it resolves into the decoding fields.
IDENTITY = ("model", "suite", "judge", "guard_config", "data_dir", "limit", "samples",
            "temperature", "top_p", "max_tokens", "repetition_penalty", "seed")
UNORDERED = ("suite", "judge")


def identity(config: EvalConfig, model: str) -> dict[str, Any]:
    values = config.to_dict() | {"model": model}
    return {key: sorted(values[key]) if key in UNORDERED else values[key] for key in IDENTITY}


def check_rerun(out: Path, config: EvalConfig, model: str) -> bool:
    """Whether ``out`` holds a run with these settings (a resume); raises EvalError when it
    holds one with others. A folder without ``run.json`` is left to Inspect."""
    path = out / RUN_FILE
    if not path.is_file():
        return False
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvalError(f"{path}: cannot read it ({error}); give another --out") from error
    now = identity(config, model)
    changed = [f"{key} {earlier.get(key)!r} -> {now[key]!r}" for key in IDENTITY
               if earlier.get(key) != now[key]]
    if changed:
        raise EvalError(f"--out {out} holds a run with other settings ({'; '.join(changed)}): "
                        "rerun with the same ones to resume it, or give another --out")
    return True


def record(out: Path, config: EvalConfig, model: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(identity(config, model), indent=2) + "\n",
                                encoding="utf-8")
