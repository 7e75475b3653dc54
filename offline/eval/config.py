"""The configuration of ``guardrail eval``: one dataclass, filled from a YAML file and then the
command line (the command line wins), as ``guardrail train`` does. A ``preset`` sets the decoding
of a paper's harness; a value given in the YAML or on the command line still wins over it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from offline.eval.errors import EvalError

# The papers' harnesses as read in their code (REFERENCE.md section 4): greedy, no system prompt.
PRESETS: dict[str, dict[str, Any]] = {
    "safechain": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16000, "samples": 1},
    "star1": {"temperature": 0.0, "max_tokens": 8000, "repetition_penalty": 1.2, "samples": 1},
}
DECODING = ("temperature", "top_p", "max_tokens", "repetition_penalty", "samples")


@dataclass
class EvalConfig:
    model: str = ""
    """A local model folder or hub id, an endpoint URL (``http://host:port/v1``), or an Inspect
    model name (``vllm/…``, ``hf/…``, ``openai/…``)."""
    suite: list[str] = field(default_factory=lambda: ["safety"])
    judge: list[str] = field(default_factory=list)
    out: str = ""
    limit: int | None = None
    data_dir: str | None = None
    guard_config: str | None = None
    """The project config whose guard judges when ``judge`` names no guard."""
    backend: str = "auto"
    """For a local model: ``auto`` (vLLM when installed and a GPU is present, else
    transformers), ``transformers`` or ``vllm``."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Passed to the model provider (vLLM: ``tensor_parallel_size``, ``data_parallel_size``…)."""
    served_model: str | None = None
    """An endpoint's model name (default: the first one ``/models`` lists)."""
    api_key_env: str = "GUARDRAIL_EVAL_API_KEY"
    preset: str | None = None
    samples: int = 1
    temperature: float = 0.0
    top_p: float | None = None
    max_tokens: int = 4096
    repetition_penalty: float | None = None
    seed: int = 42
    max_connections: int = 8
    max_retries: int = 3
    request_timeout_s: int = 900
    retry_attempts: int = 2
    """Whole-task retries inside one run (each reuses the items already finished)."""
    fail_on_error: float | None = None
    """Inspect's: None fails a benchmark on its first generation error (a rerun resumes it);
    a fraction tolerates that share of items failing (counted in ``n_errors``)."""
    log_buffer: int = 1
    max_tasks: int = 4
    max_samples: int | None = None
    """Items in flight per benchmark (Inspect's default: max_connections + 1)."""
    """Benchmarks run at once (their requests share ``max_connections`` per model)."""
    display: str = "rich"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {item.name: item for item in dataclasses.fields(EvalConfig)}


def _coerce(name: str, value: Any) -> Any:
    kind = str(FIELDS[name].type)
    if value is None:
        return None
    try:
        if kind.startswith("list"):
            return [str(item) for item in (value if isinstance(value, list) else [value])]
        if kind.startswith("int"):
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except (TypeError, ValueError) as error:
        wanted = "an integer" if kind.startswith("int") else "a number"
        raise EvalError(f"config: {name}: {value!r} is not {wanted}") from error
    return value


def load(path: str | None, overrides: dict[str, Any]) -> EvalConfig:
    """Defaults, then the YAML file, then the command line's values (those not None); then the
    preset fills the decoding values neither set."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise EvalError(f"{path}: cannot read ({error.strerror})") from error
        except yaml.YAMLError as error:
            raise EvalError(f"{path}: not valid YAML ({error})") from error
        if not isinstance(loaded, dict):
            raise EvalError(f"{path}: expected a mapping of settings")
        unknown = sorted(set(loaded) - set(FIELDS))
        if unknown:
            raise EvalError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: "
                            f"{', '.join(FIELDS)}")
        data.update(loaded)
    data.update({key: value for key, value in overrides.items() if value is not None})
    explicit = set(data)
    preset = data.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise EvalError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            if key not in explicit:
                data[key] = value
    config = EvalConfig(**{key: _coerce(key, value) for key, value in data.items()})
    if config.samples < 1:
        raise EvalError("samples must be at least 1")
    if config.limit is not None and config.limit < 1:
        raise EvalError(f"limit must be at least 1 (items per benchmark), not {config.limit}")
    if not config.model:
        raise EvalError("no model: give --model (a folder, hub id, endpoint URL or Inspect name)")
    if not config.out:
        raise EvalError("no output folder: give --out DIR")
    return config


def generation(config: EvalConfig) -> dict[str, Any]:
    """The decoding as recorded in summary.json and the manifest."""
    return {"preset": config.preset, "samples": config.samples,
            "temperature": config.temperature, "top_p": config.top_p,
            "max_tokens": config.max_tokens, "repetition_penalty": config.repetition_penalty,
            "seed": config.seed, "max_connections": config.max_connections}
