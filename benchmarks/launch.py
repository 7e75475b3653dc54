"""Start the servers the benchmarks compare, each in its own process, on loopback: the fake
model, our proxy (with a given guard section), and LiteLLM's proxy with no guardrail."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.processes import ServerProcess, free_port
from benchmarks.stream_client import Target

PROXY_KEY = "sk-bench-" + secrets.token_hex(16)
"""The one client key both proxies are given, so each pays for its own key check."""

LITELLM_ENV = "LITELLM_PROXY_BIN"
DEFAULT_LITELLM = Path(".venv-litellm/bin/litellm")


def start_upstream(workdir: Path, chunks: int, chunk_delay_ms: float = 0.0,
                   ) -> tuple[ServerProcess, Target]:
    port = free_port()
    server = ServerProcess(
        "fake model", [sys.executable, "-m", "benchmarks.fake_upstream", "--port", str(port),
                       "--chunks", str(chunks), "--chunk-delay-ms", str(chunk_delay_ms)],
        f"http://127.0.0.1:{port}/v1/models", workdir / "upstream.log")
    return server, Target("direct to the model", f"http://127.0.0.1:{port}/v1")


def start_fake_guard(workdir: Path, delay_ms: float) -> tuple[ServerProcess, str]:
    """The fake Llama Guard endpoint (vLLM's wire format) answering after ``delay_ms``; its
    ``/v1`` base URL."""
    port = free_port()
    server = ServerProcess(
        "fake guard", [sys.executable, "-m", "benchmarks.fake_guard", "--port", str(port),
                       "--delay-ms", str(delay_ms)],
        f"http://127.0.0.1:{port}/v1/models", workdir / "guard.log")
    return server, f"http://127.0.0.1:{port}/v1"


def start_guardrail(name: str, workdir: Path, upstream: Target, guard: dict[str, Any],
                    workers: int = 1, server: dict[str, Any] | None = None,
                    **sections: dict[str, Any]) -> tuple[ServerProcess, Target]:
    """Our proxy as users run it (``guardrail serve --config``), with its default store; ready
    when ``/readyz`` says so (the guard warmed up). ``server`` adds to its server section."""
    port = free_port()
    slug = name.replace(" ", "-").replace(",", "")
    config = {
        "upstream": {"url": upstream.base_url},
        "guard": guard,
        "store": {"url": f"sqlite:///{workdir / slug}.db",
                  "fallback_path": str(workdir / f"{slug}-unstored.jsonl")},
        "server": {"host": "127.0.0.1", "port": port, "api_keys": [PROXY_KEY],
                   "workers": workers, **(server or {})},
        **sections,
    }
    config_path = workdir / f"{slug}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    guardrail = Path(sys.executable).parent / "guardrail"
    process = ServerProcess(name, [str(guardrail), "serve", "--config", str(config_path)],
                            f"http://127.0.0.1:{port}/readyz", workdir / f"{slug}.log")
    return process, Target(name, f"http://127.0.0.1:{port}/v1", PROXY_KEY)


def litellm_executable(explicit: str | None = None) -> Path | None:
    for candidate in (explicit, os.environ.get(LITELLM_ENV), DEFAULT_LITELLM,
                      shutil.which("litellm")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def start_litellm(executable: Path, workdir: Path, upstream: Target
                  ) -> tuple[ServerProcess, Target]:
    """LiteLLM's proxy with one worker (as ours runs), the fake as an OpenAI-compatible model,
    a master key and no database, callbacks or guardrails."""
    port = free_port()
    config_path = workdir / "litellm.yaml"
    config_path.write_text(yaml.safe_dump({"model_list": [{
        "model_name": "fake-model",
        "litellm_params": {"model": "openai/fake-model", "api_base": upstream.base_url,
                           "api_key": "unused"},
    }]}))
    server = ServerProcess(
        "LiteLLM proxy", [str(executable), "--config", str(config_path), "--host", "127.0.0.1",
                          "--port", str(port), "--num_workers", "1"],
        f"http://127.0.0.1:{port}/health/liveliness", workdir / "litellm.log",
        # No network here: LiteLLM would otherwise try to download its model price list.
        env={"LITELLM_MASTER_KEY": PROXY_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    return server, Target("LiteLLM proxy, no guardrail", f"http://127.0.0.1:{port}/v1",
                          PROXY_KEY)
