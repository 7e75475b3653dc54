"""The configuration of ``guardrail cycle``: one YAML file, one dataclass per stage.

Every key is checked before anything runs: an unknown key, a value of the wrong type or a
missing required one is a :class:`CycleConfigError` whose message is one line naming the key.
Paths in the file are taken relative to the file's own folder, so a config can travel with its
data. Each stage section also takes ``args``: extra flags passed as they are to the stage's own
command (``guardrail harvest``, ``correct``, ``train``, ``eval``), for options the cycle does
not name itself.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class CycleConfigError(ValueError):
    """A configuration the cycle cannot run; the message is one line."""


@dataclass
class HarvestStage:
    store: str | None = None
    """Case store URL (default: the proxy config's ``store.url``)."""
    args: list[str] = field(default_factory=list)


@dataclass
class CorrectStage:
    model: str = ""
    """The corrector: any LiteLLM model string (``openai/gpt-4.1``)."""
    api_base: str | None = None
    api_key_env: str | None = None
    select: list[str] = field(default_factory=lambda: ["refuse"])
    """Harvested records whose ``correction`` is one of these are rewritten by the model;
    the default takes the cases the proxy only refused."""
    args: list[str] = field(default_factory=list)


@dataclass
class TrainStage:
    model: str = ""
    """The base model: a folder or a hub id. It is also the model evaluated as "base"."""
    method: str = "sft"
    """``sft`` on the UnsafeChain records, or ``dpo`` on the preference pairs."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The train command's own YAML (``lora``, ``merge``, ``sft:``/``dpo:`` mappings...)."""
    args: list[str] = field(default_factory=list)


@dataclass
class ProxyServing:
    serve: str = ""
    """How to serve a model over an OpenAI-compatible API: a command template with ``{model}``
    (the model folder or id) and ``{port}`` (a free loopback port the cycle picks), e.g.
    ``vllm serve {model} --port {port}``. The cycle starts it, waits for ``GET /v1/models``,
    then starts ``guardrail serve`` in front of it; both stop when the stage ends."""
    config: str | None = None
    """The proxy's config for these runs (default: the cycle's ``proxy_config``). Its upstream,
    listening port and store are set by the cycle: cases go to the stage's own store, never to
    the production one."""
    served_model_name: str | None = None
    """The name the serve command serves the model under (default: ``{model}``'s value, as
    vLLM does); the proxy sends every request upstream under this name."""
    ready_timeout_s: float = 600.0
    models: list[str] = field(default_factory=lambda: ["base", "tuned"])
    """Which models to evaluate behind the proxy: ``base``, ``tuned`` or both."""


@dataclass
class EvalStage:
    suite: list[str] = field(default_factory=lambda: ["safety"])
    """Suites or benchmark names (``guardrail eval --suite``)."""
    judge: list[str] = field(default_factory=list)
    """Each a ``guardrail eval --judge``: a guard (kind or config .yaml) or a judge model."""
    limit: int | None = None
    data_dir: str | None = None
    config: str | None = None
    """``guardrail eval --config FILE``."""
    endpoint: str = "{url}"
    """How an OpenAI-compatible endpoint is named to ``guardrail eval --model``; ``{url}`` is
    the base URL (``http://127.0.0.1:PORT/v1``)."""
    proxy: ProxyServing | None = None
    """Also evaluate each model behind the proxy; omitted: the models alone."""
    args: list[str] = field(default_factory=list)


@dataclass
class CycleConfig:
    proxy_config: str = ""
    """The proxy's YAML config: its store is harvested, its guard re-judges."""
    out: str | None = None
    """The cycle's folder (``--out`` wins)."""
    harvest: HarvestStage = field(default_factory=HarvestStage)
    correct: CorrectStage | None = None
    """Omitted: the harvested records are trained on as they are."""
    train: TrainStage = field(default_factory=TrainStage)
    eval: EvalStage | None = field(default_factory=EvalStage)
    """``null``: no evaluation (harvest, correct and train only)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PATH_KEYS = {("proxy_config",), ("out",), ("eval", "data_dir"), ("eval", "config"),
              ("eval", "proxy", "config")}
METHODS = ("sft", "dpo")
# Keys of the train command's own config that the cycle sets for each run.
_TRAIN_OWNED = ("data", "model", "out")


_TYPE_NAMES = {str: "string", int: "whole number", float: "number", bool: "true or false"}


def _type_name(kind: Any) -> str:
    return _TYPE_NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def _build(cls: type[Any], raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise CycleConfigError(f"{where or 'config'}: a mapping, not {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = [item.name for item in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise CycleConfigError(f"{name}: unknown key (known: {', '.join(names)})")
        values[key] = _value(hints[key], value, name)
    return cls(**values)


def _value(kind: Any, value: Any, name: str) -> Any:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [option for option in get_args(kind) if option is not type(None)]
        if value is None:
            if type(None) in get_args(kind):
                return None
            raise CycleConfigError(f"{name}: may not be null")
        return _value(options[0], value, name)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, name)  # type: ignore[arg-type]
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(
                isinstance(item, str | int | float) and not isinstance(item, bool)
                for item in value):
            raise CycleConfigError(f"{name}: a list of strings, not {value!r}")
        return [str(item) for item in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise CycleConfigError(f"{name}: a mapping, not {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise CycleConfigError(f"{name}: expected a {_type_name(kind)}, not {value!r}")
    return value


def _rebase(config: CycleConfig, folder: Path) -> None:
    """Relative paths in the file are relative to the file, not to where the cycle runs."""
    for key in _PATH_KEYS:
        owner: Any = config
        for part in key[:-1]:
            owner = getattr(owner, part)
            if owner is None:
                break
        else:
            value = getattr(owner, key[-1])
            if value and not Path(value).is_absolute():
                setattr(owner, key[-1], str(folder / value))
    # A judge is a guard kind, a model name or a guard's .yaml: only a file here is a path.
    if config.eval is not None:
        config.eval.judge = [str(folder / judge) if (folder / judge).is_file() else judge
                             for judge in config.eval.judge]
    # A model is a folder or a hub id: only a relative name that is a folder here is a path.
    if config.train.model and (folder / config.train.model).is_dir():
        config.train.model = str(folder / config.train.model)


def check(config: CycleConfig) -> None:
    if not config.proxy_config:
        raise CycleConfigError("proxy_config: required (the proxy's YAML: its store is "
                               "harvested)")
    if not config.train.model:
        raise CycleConfigError("train.model: required (the base model: a folder or hub id)")
    if config.train.method not in METHODS:
        raise CycleConfigError(f"train.method: one of {', '.join(METHODS)}, not "
                               f"{config.train.method!r}")
    for key in _TRAIN_OWNED:
        if key in config.train.settings:
            raise CycleConfigError(f"train.settings.{key}: set by the cycle for each run")
    settings = config.train.settings
    if settings.get("lora") and not settings.get("merge") and config.eval is not None:
        raise CycleConfigError("train.settings: lora without merge saves an adapter; the "
                               "cycle evaluates a model, so set merge: true")
    if config.correct is not None and not config.correct.model:
        raise CycleConfigError("correct.model: required when correct is given (a LiteLLM "
                               "model string)")
    if config.eval is not None:
        if config.eval.limit is not None and config.eval.limit < 1:
            raise CycleConfigError(f"eval.limit: at least 1, not {config.eval.limit}")
        if "{url}" not in config.eval.endpoint:
            raise CycleConfigError("eval.endpoint: a template holding {url}")
        proxy = config.eval.proxy
        if proxy is not None:
            if "{port}" not in proxy.serve:
                raise CycleConfigError("eval.proxy.serve: a command template holding {port} "
                                       "(and {model}), e.g. 'vllm serve {model} --port {port}'")
            unknown = [name for name in proxy.models if name not in ("base", "tuned")]
            if unknown or not proxy.models:
                raise CycleConfigError(f"eval.proxy.models: base and/or tuned, not "
                                       f"{proxy.models!r}")
            if proxy.ready_timeout_s <= 0:
                raise CycleConfigError("eval.proxy.ready_timeout_s: more than 0")


def load_cycle_config(path: Path) -> CycleConfig:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CycleConfigError(f"{path}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise CycleConfigError(f"{path}: not YAML ({str(error).splitlines()[0]})") from None
    config: CycleConfig = _build(CycleConfig, loaded, "")
    _rebase(config, path.resolve().parent)
    check(config)
    return config
