"""Servers under benchmark, each in its own process: started, waited for, measured (CPU time and
memory from /proc, summed over the process and its children), and stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

_TICKS = os.sysconf("SC_CLK_TCK")


class ServerProcess:
    def __init__(self, name: str, command: Sequence[str], ready_url: str, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.command = list(command)
        self.ready_url = ready_url
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before "
                                   f"it was ready:\n{self.log_tail()}")
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def pids(self) -> list[int]:
        """The process and all its descendants (workers a server forks)."""
        found = [self.process.pid]
        for pid in found:
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    found += [int(child) for child in task.read_text().split()]
                except OSError:
                    continue
        return found

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / _TICKS

    def memory_mib(self, field: str = "VmRSS") -> float:
        """``VmRSS`` (now) or ``VmHWM`` (peak), summed over the process tree, in MiB."""
        total_kib = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith(f"{field}:"):
                    total_kib += int(line.split()[1])
        return total_kib / 1024

    def memory_by_process(self) -> list[tuple[int, float, float, float]]:
        """``(pid, RSS, PSS, USS)`` in MiB for the process and each descendant. PSS splits
        each shared page among the processes that map it, USS is what only that process holds:
        together they say whether the workers share their guard's memory."""
        rows = []
        for pid in self.pids():
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]
                      if line.split()[-1] == "kB"}
            uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
            rows.append((pid, fields.get("Rss", 0) / 1024, fields.get("Pss", 0) / 1024,
                         uss / 1024))
        return rows

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
