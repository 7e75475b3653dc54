"""Serving processes: uvicorn's server with a drain on SIGTERM, and a supervisor for several.

``GuardrailServer`` is uvicorn's ``Server`` with two changes. SIGTERM does not stop it at once:
it starts the drain (``server/drain.py``) and the server stops when the drain ends (SIGINT
stops it as uvicorn does). And a start-up error found after it
began listening (the guard's warm-up) stops it, so the command can report that error.

With ``--workers N`` (``run_workers``) this process binds the port and starts N worker
processes (spawned, as uvicorn's own supervisor does: a fresh interpreter each, so each loads
its own guard) that share the listening socket; the kernel spreads connections over them. It
forwards SIGTERM and SIGINT to them, restarts one that dies while serving, stops all when one
cannot start, and owns the folder the workers' Prometheus files live in (created fresh, a dead
worker's live gauges cleared with ``mark_process_dead``, removed at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.config
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import LOGGING_CONFIG

from guardrail.config import Config
from guardrail.errors import GuardrailError
from guardrail.metrics import MULTIPROC_ENV
from server.app import create_app
from server.logs import json_logging_config
from server.shared_rate_limit import SharedBuckets

logger = logging.getLogger(__name__)

STARTUP_FAILED = 2
"""A worker's exit status when it could not start (its error is in the errors folder)."""

SHUTDOWN_GRACE_S = 5
"""After the drain, how long uvicorn waits for connections to close before it cuts them."""

# Store writes and CPU guard inference run in worker threads. While the event loop is busy
# (many streams, or one fast one) a thread that finished waits for the GIL up to the switch
# interval, 5 ms by default, and a stream's first byte waits on its case write.
_THREAD_SWITCH_INTERVAL_S = 0.0005


def configure_logging(config: Config) -> None:
    """Our loggers' format in this process (uvicorn's are set by its ``Config``)."""
    if config.server.log_format == "json":
        logging.config.dictConfig(json_logging_config(redact_text=bool(config.store.redact)))
    else:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # One line per upstream call says nothing the access log does not; warnings still show.
        logging.getLogger("httpx").setLevel(logging.WARNING)


class GuardrailServer(uvicorn.Server):
    def __init__(self, config: Config, rate_limit_file: Path | None = None) -> None:
        self.guardrail_config = config
        self.app = create_app(config, on_fatal=self._stop_on_error,
                              rate_limit_file=rate_limit_file)
        if config.server.log_format == "json":
            log_config: dict[str, Any] = json_logging_config(
                redact_text=bool(config.store.redact))
        else:
            log_config = LOGGING_CONFIG
        super().__init__(uvicorn.Config(
            self.app, host=config.server.host, port=config.server.port, log_level="info",
            log_config=log_config, timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def startup_error(self) -> GuardrailError | None:
        error: GuardrailError | None = getattr(self.app.state, "startup_error", None)
        return error

    def _stop_on_error(self, error: GuardrailError) -> None:
        logger.debug("stopping: %s", error)
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain_seconds = self.guardrail_config.server.drain_seconds
        if sig == signal.SIGTERM and drain_seconds > 0 and not self.should_exit:
            # Runs in the signal handler: only note it; on_tick starts the drain on the loop.
            # A SIGTERM during the drain changes nothing: a worker may get it twice (from
            # the supervisor, and from systemd or a shell signalling the whole group).
            # SIGINT stops at once.
            self._drain_requested = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="drain")
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        try:
            await self.app.state.drain.run(self.guardrail_config.server.drain_seconds)
        finally:
            self.should_exit = True


def run_server(config: Config, sockets: list[socket.socket] | None = None,
               rate_limit_file: Path | None = None) -> GuardrailServer:
    """Serve until stopped, in this process."""
    sys.setswitchinterval(_THREAD_SWITCH_INTERVAL_S)
    server = GuardrailServer(config, rate_limit_file)
    # A start-up error is reported as one line by the command, not as uvicorn's traceback.
    quiet = _QuietStartupFailure(server)
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addFilter(quiet)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it stopped on once it has stopped: that is done
    finally:
        uvicorn_logger.removeFilter(quiet)
    return server


class _QuietStartupFailure(logging.Filter):
    """Drops uvicorn's start-up failure logs once the app recorded a start-up error."""

    def __init__(self, server: GuardrailServer) -> None:
        super().__init__()
        self.server = server

    def filter(self, record: logging.LogRecord) -> bool:
        return self.server.startup_error is None


# -- several workers -------------------------------------------------------------------------


def _worker_main(runtime: str, listener: socket.socket) -> None:
    """A worker process: serve on the shared socket; exit STARTUP_FAILED, its error written
    to the errors folder, if it cannot start."""
    folder = Path(runtime)
    config = Config.model_validate_json((folder / "config.json").read_text(encoding="utf-8"))
    configure_logging(config)
    server = run_server(config, [listener], folder / "rate-limit")
    errors = folder / "errors"
    if server.startup_error is not None or not server.started:
        message = (str(server.startup_error) if server.startup_error is not None
                   else "a worker failed to start (its log says why)")
        (errors / str(os.getpid())).write_text(message, encoding="utf-8")
        sys.exit(STARTUP_FAILED)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


class WorkerSupervisor:
    def __init__(self, config: Config, workers: int) -> None:
        self.config = config
        self.workers = workers
        self.runtime = Path(tempfile.mkdtemp(prefix="guardrail-serve-"))
        self.metrics_dir = self.runtime / "metrics"
        self.errors_dir = self.runtime / "errors"
        self.config_path = self.runtime / "config.json"
        self.rate_limit_path = self.runtime / "rate-limit"
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._stopping = False

    def run(self) -> str | None:
        """Serve until stopped; the start-up error of a worker that could not start, if any."""
        previous_env = os.environ.get(MULTIPROC_ENV)
        previous_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM,
                                                                     signal.SIGINT)}
        listener: socket.socket | None = None
        try:
            self.metrics_dir.mkdir()
            self.errors_dir.mkdir()
            # The config as validated here (overrides applied, ${VAR}s expanded), readable by
            # this user only: it may hold keys.
            descriptor = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(self.config.model_dump_json())
            SharedBuckets.create(self.rate_limit_path)
            # Set before the workers start: prometheus_client reads it as it is imported.
            os.environ[MULTIPROC_ENV] = str(self.metrics_dir)
            listener = _bind(self.config.server.host, self.config.server.port)
            for sig in previous_handlers:
                signal.signal(sig, self._forward)
            for _ in range(self.workers):
                self._processes.append(self._start(listener))
            logger.info("%d workers serving (pids %s)", self.workers,
                        ", ".join(str(process.pid) for process in self._processes))
            return self._supervise(listener)
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if previous_env is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous_env
            if listener is not None:
                listener.close()
            shutil.rmtree(self.runtime, ignore_errors=True)

    def _start(self, listener: socket.socket) -> multiprocessing.process.BaseProcess:
        process = self._context.Process(
            target=_worker_main, name="guardrail-worker",
            args=(str(self.runtime), listener))
        process.start()
        return process

    def _forward(self, sig: int, frame: FrameType | None) -> None:
        self._stopping = True
        for process in self._processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def _supervise(self, listener: socket.socket) -> str | None:
        startup_error: str | None = None
        while self._processes:
            sentinels = [process.sentinel for process in self._processes]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            for process in [process for process in self._processes if not process.is_alive()]:
                process.join()
                self._processes.remove(process)
                assert process.pid is not None
                # Its live gauges (responses in flight) must not count any more.
                mark_process_dead(process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
                if process.exitcode == STARTUP_FAILED:
                    if startup_error is None:
                        startup_error = self._startup_error(process.pid)
                    if not self._stopping:
                        self._forward(signal.SIGTERM, None)
                elif not self._stopping:
                    logger.warning("worker %d exited (status %s) while serving; starting "
                                   "another", process.pid, process.exitcode)
                    self._processes.append(self._start(listener))
        return startup_error

    def _startup_error(self, pid: int) -> str:
        try:
            return (self.errors_dir / str(pid)).read_text(encoding="utf-8")
        except OSError:
            return f"worker {pid} failed to start (its log says why)"
