"""``guardrail serve`` as a real subprocess on loopback, for tests of what only a process shows:
several workers, signals, the log on stderr."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fakes.loopback import free_port

GUARDRAIL = Path(sys.executable).parent / "guardrail"


class ServeProcess:
    def __init__(self, tmp_path: Path, config: dict[str, Any], *, name: str = "proxy",
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {**config, "server": {**config.get("server", {}), "port": self.port}}
        self.config_path = tmp_path / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.stderr_path = tmp_path / f"{name}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.process = subprocess.Popen(
            [str(GUARDRAIL), "serve", "--config", str(self.config_path), *args],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=self._stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True)  # its own process group, for terminate(group=True)

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"serve exited: {self.stderr()}"
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"serve never answered: {self.stderr()}"
            time.sleep(0.1)

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def terminate(self, *, group: bool = False) -> None:
        """SIGTERM to the command, or to all its processes at once (as systemd does)."""
        if self.process.poll() is None:
            if group:
                os.killpg(self.process.pid, signal.SIGTERM)
            else:
                self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 60.0) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self._stderr.close()

    def stop(self) -> None:
        """Stops it whatever state it is in (the tests' clean-up)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()


def stored_cases(database: Path) -> list[dict[str, Any]]:
    """Every case record in a SQLite store, read directly (the proxy may be gone)."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT record FROM cases").fetchall()
    return [json.loads(row[0]) for row in rows]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 if absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        if all(found.get(key) == f'"{wanted}"' for key, wanted in labels.items()):
            return float(value)
    return 0.0
