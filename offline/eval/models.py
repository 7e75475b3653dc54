"""From ``--model`` (and a model ``--judge``) to an Inspect model, checked before the run: a
folder that is not a model, a model that cannot load, an endpoint that does not answer or an
unknown provider each end the command with one line, before anything is generated.

- ``http(s)://…``: an OpenAI-compatible endpoint (the proxy included), through
  ``guardrail-openai`` (Inspect's OpenAI-compatible provider keeping the proxy's own field).
- ``provider/name`` where ``provider`` is an Inspect model provider (``vllm/``, ``hf/``,
  ``openai/``, ``openai-api/…``, ``guardrail-hf/``): passed to Inspect as it is.
- anything else: a local folder or a hub id, run by ``backend``: vLLM (``vllm/``) when it is
  installed and a GPU is present, else transformers (``guardrail-hf/``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from offline.eval.errors import EvalError, plain


@dataclass(frozen=True)
class ModelChoice:
    name: str
    """The Inspect model name."""
    args: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    """What the user gave, for the summary and report."""
    endpoint: str | None = None


def is_inspect_provider(prefix: str) -> bool:
    import inspect_ai.model  # noqa: F401 - registers the built-in providers
    from inspect_ai._util.registry import registry_find, registry_unqualified_name

    import offline.eval.providers  # noqa: F401 - registers ours

    return bool(registry_find(lambda info: info.type == "modelapi"
                              and registry_unqualified_name(info) == prefix))


def endpoint_models(url: str, api_key: str | None, timeout_s: float = 10.0) -> list[str]:
    """The endpoint's ``/models`` ids; an EvalError when it does not answer as one."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as error:
        raise EvalError(f"endpoint {url} does not answer ({type(error).__name__}: "
                        f"{error or 'no detail'})") from error
    if response.status_code != 200:
        raise EvalError(f"endpoint {url}: GET /models answered HTTP {response.status_code} "
                        "(is this the OpenAI-compatible base URL, ending in /v1?)")
    try:
        return [str(item["id"]) for item in response.json()["data"]]
    except (ValueError, KeyError, TypeError) as error:
        raise EvalError(f"endpoint {url}: /models is not an OpenAI model list") from error


def _vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def choose(model: str, *, backend: str = "auto", served_model: str | None = None,
           api_key_env: str = "GUARDRAIL_EVAL_API_KEY",
           model_args: dict[str, Any] | None = None) -> ModelChoice:
    args = dict(model_args or {})
    if model.startswith(("http://", "https://")):
        key = os.environ.get(api_key_env)
        served = endpoint_models(model, key)
        name = served_model or (served[0] if served else None)
        if name is None:
            raise EvalError(f"endpoint {model} lists no models; give --served-model")
        return ModelChoice(f"guardrail-openai/{name}",
                           {**args, "base_url": model, "api_key": key or "EMPTY"},
                           label=f"{model} ({name})", endpoint=model)
    prefix = model.split("/", 1)[0]
    if "/" in model and not Path(model).exists() and is_inspect_provider(prefix):
        return ModelChoice(model, args, label=model)
    path = Path(model)
    if not path.exists() and model.startswith(("/", "./", "../", "~")):
        # Not a hub id either: transformers would answer "Repo id must be in the form ...".
        raise EvalError(f"{model}: no such model folder")
    if path.exists() and not (path / "config.json").is_file():
        raise EvalError(f"{model}: not a model folder (no config.json)")
    if backend not in ("auto", "transformers", "vllm"):
        raise EvalError(f"unknown backend {backend!r}; known: auto, transformers, vllm")
    if backend == "vllm" or (backend == "auto" and _vllm_usable()):
        if importlib.util.find_spec("vllm") is None:
            raise EvalError("backend vllm: vLLM is not installed (pip install "
                            "'reasoning-guardrail[vllm]')")
        return ModelChoice(f"vllm/{model}", args, label=model)
    return ModelChoice(f"guardrail-hf/{model}", args, label=model)


def load(choice: ModelChoice, **config: Any) -> Any:
    """The Inspect Model, loaded now so that a model that cannot load fails in one line."""
    from inspect_ai.model import GenerateConfig, get_model

    import offline.eval.providers  # noqa: F401

    try:
        return get_model(choice.name, config=GenerateConfig(**config), memoize=False,
                         **choice.args)
    except Exception as error:
        detail = plain(" ".join(str(error).split()))[:300]
        raise EvalError(f"model {choice.label or choice.name} cannot load "
                        f"({type(error).__name__}: {detail})") from error
