"""The configuration of ``guardrail train sft``: our fields, and TRL's SFTConfig fields (``sft``).

Shaped like TRL's scripts: one dataclass, filled from a YAML file and then the command line
(the command line wins). Every SFTConfig field can be set in the YAML's ``sft:`` mapping (or with
``--sft KEY=VALUE``); the fields this command owns (the output folder, max_length, the seed) are
top-level keys and refused under ``sft`` so that one value cannot be set twice. Nothing here
imports torch: a bad config fails in a moment, before any weights load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from offline.train.data_spec import parse_specs
from offline.train.errors import TrainInputError
from offline.train.trl_settings import coerce


class ConfigError(TrainInputError):
    """A configuration the command cannot run; the message is one line naming the problem."""


# SFTConfig fields that our own top-level fields set.
OWNED = {"output_dir": "out", "max_length": "max_length", "seed": "seed",
         "resume_from_checkpoint": "resume"}
# Our defaults for SFTConfig, each overridable under ``sft``. Activation checkpointing is TRL's
# default but warns (FutureWarning) on CPU and small models; ask for it where it pays.
SFT_DEFAULTS: dict[str, Any] = {
    "activation_checkpointing": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 500,
    "include_num_input_tokens_seen": "non_padding",  # tokens trained on, not padding
    "dataloader_num_workers": 0,
}


@dataclass
class SFTScriptConfig:
    data: list[Any] = field(default_factory=list)
    """``PATH[:RATIO]`` strings or ``{path, ratio}`` mappings (offline/train/data_spec.py)."""
    model: str = ""
    out: str = ""
    lora: bool = False
    merge: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"
    max_length: int = 8192
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    sft: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {item.name for item in dataclasses.fields(SFTScriptConfig)}


def sft_fields() -> dict[str, Any]:
    """SFTConfig's settable fields and their defaults."""
    from trl.trainer.sft_config import SFTConfig  # light: no weights, no torch work

    return {item.name: item.default for item in dataclasses.fields(SFTConfig) if item.init}


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"config {path}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path}: not YAML ({str(error).splitlines()[0]})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path}: a mapping of settings, not {type(loaded).__name__}")
    return loaded


def resolve(from_yaml: dict[str, Any], from_cli: dict[str, Any]) -> SFTScriptConfig:
    """Defaults, then the YAML, then the command line; ``sft`` mappings merge key by key."""
    merged: dict[str, Any] = {}
    for source, where in ((from_yaml, "config"), (from_cli, "command line")):
        for key, value in source.items():
            if key not in FIELDS:
                known = ", ".join(sorted(FIELDS))
                raise ConfigError(f"{where}: unknown key {key!r} (known: {known})")
            if key == "sft":
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: 'sft' is a mapping of SFTConfig fields")
                merged["sft"] = {**merged.get("sft", {}), **value}
            elif value is not None:
                merged[key] = value
    config = SFTScriptConfig(**merged)
    check(config)
    return config


def check(config: SFTScriptConfig) -> None:
    for name in ("data", "model", "out"):
        if not getattr(config, name):
            raise ConfigError(f"--{name} is required (or {name!r} in the config)")
    if not isinstance(config.data, list):
        config.data = [config.data]
    _check_types(config)
    parse_specs(config.data)  # a bad entry or ratio fails here, before any file is read
    known = sft_fields()
    for key in config.sft:
        if key in OWNED:
            raise ConfigError(f"sft.{key}: set it as {OWNED[key]!r} at the top level")
        if key not in known:
            raise ConfigError(f"sft: unknown SFTConfig key {key!r}")
        config.sft[key] = coerce(f"sft.{key}", config.sft[key], known[key])
    if config.merge and not config.lora:
        raise ConfigError("--merge merges a LoRA adapter: it needs --lora")
    if config.max_length < 2:
        raise ConfigError(f"max_length: at least 2 tokens, not {config.max_length}")
    for name in ("lora_r", "lora_alpha"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: a positive integer, not {getattr(config, name)}")


TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "out": (str,), "lora": (bool,), "merge": (bool,), "overwrite": (bool,),
    "lora_r": (int,), "lora_alpha": (int,), "max_length": (int,), "seed": (int,),
    "lora_dropout": (float, int), "lora_target_modules": (str, list),
    "resume": (str, type(None)),
}


def _check_types(config: SFTScriptConfig) -> None:
    """Our own fields have fixed types; a YAML slip (``seed: ten``) is one line, not a crash."""
    for name, types in TYPES.items():
        value = getattr(config, name)
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            wanted = " or ".join(kind.__name__ for kind in types)
            raise ConfigError(f"{name}: expected {wanted}, not {value!r}")


def sft_arguments(config: SFTScriptConfig, output_dir: Path) -> dict[str, Any]:
    """The keyword arguments for TRL's SFTConfig."""
    return {**SFT_DEFAULTS, **config.sft, "output_dir": str(output_dir),
            "max_length": config.max_length, "seed": config.seed}
