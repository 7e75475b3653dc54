"""A model served over an OpenAI-compatible API with the proxy in front, for one stage.

The serve command is the config's template (``vllm serve {model} --port {port}``) with a free
loopback port; once it answers ``GET /v1/models``, ``guardrail serve`` starts in front of it with
the stage's proxy config: the user's file with its upstream pointed at the served model, its own
port, no client API keys (loopback only) and its own case store in the stage folder, so that
evaluation traffic never lands in the production store. Both run in their own process groups
and are stopped (SIGTERM, then SIGKILL) when the stage ends, whatever happened.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from offline.cycle.commands import guardrail_command, last_line
from offline.cycle.config import ProxyServing
from offline.cycle.stage import StageFailed

_STOP_WAIT_S = 15.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class Background:
    """A server in its own process group, its output in a log file."""

    def __init__(self, stage: str, name: str, argv: list[str], log: Path) -> None:
        self.stage, self.name, self.log = stage, name, log
        with log.open("ab") as handle:
            handle.write(f"$ {' '.join(argv)}\n".encode())
            handle.flush()
            try:
                self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=handle,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True)
            except OSError as error:
                raise StageFailed(f"stage {stage}: cannot start the {name} ({argv[0]}: "
                                  f"{error.strerror})") from None

    def wait_ready(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise StageFailed(f"stage {self.stage}: the {self.name} exited ({code}) before "
                                  f"it was ready: {last_line(self.log) or 'no output'} "
                                  f"[log: {self.log}]")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise StageFailed(f"stage {self.stage}: the {self.name} did not answer {url} "
                                  f"within {timeout_s:.0f} s [log: {self.log}]")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


def proxy_settings(source: Path, *, upstream_url: str, served_model: str, port: int,
                   folder: Path) -> dict[str, Any]:
    """The user's proxy config, pointed at the served model and kept to this stage."""
    try:
        loaded = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise StageFailed(f"proxy config {source}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise StageFailed(f"proxy config {source}: not YAML "
                          f"({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise StageFailed(f"proxy config {source}: a mapping of settings")
    settings = dict(loaded)
    upstream = {key: value for key, value in (settings.get("upstream") or {}).items()
                if key not in ("kind", "url", "model")}
    # The served name: requests naming another model are rewritten to it by the proxy.
    settings["upstream"] = {**upstream, "kind": "openai", "url": upstream_url,
                            "model": served_model}
    settings["server"] = {**(settings.get("server") or {}), "host": "127.0.0.1", "port": port,
                          "api_keys": []}
    settings["store"] = {**(settings.get("store") or {}),
                         "url": f"sqlite:///{(folder / 'proxy-cases.db').resolve()}",
                         "fallback_path": str((folder / "proxy-unstored.jsonl").resolve())}
    return settings


@contextmanager
def proxy_in_front(stage: str, model: str, serving: ProxyServing, proxy_config: Path,
                   folder: Path) -> Iterator[str]:
    """Serves ``model``, starts the proxy in front, yields the proxy's base URL (``.../v1``)."""
    upstream_port, proxy_port = free_port(), free_port()
    # Replaced, not str.format: a serve command may hold other braces (JSON options).
    argv = [part.replace("{model}", model).replace("{port}", str(upstream_port))
            for part in shlex.split(serving.serve)]
    with ExitStack() as stack:
        upstream = Background(stage, "model server", argv, folder / "model-server.log")
        stack.callback(upstream.stop)
        upstream.wait_ready(f"http://127.0.0.1:{upstream_port}/v1/models",
                            serving.ready_timeout_s)
        settings = proxy_settings(proxy_config,
                                  upstream_url=f"http://127.0.0.1:{upstream_port}/v1",
                                  served_model=serving.served_model_name or model,
                                  port=proxy_port, folder=folder)
        config_file = folder / "proxy.yaml"
        config_file.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
        proxy = Background(stage, "proxy", guardrail_command("serve", "--config",
                                                             str(config_file)),
                           folder / "proxy.log")
        stack.callback(proxy.stop)
        proxy.wait_ready(f"http://127.0.0.1:{proxy_port}/readyz", serving.ready_timeout_s)
        yield f"http://127.0.0.1:{proxy_port}/v1"
