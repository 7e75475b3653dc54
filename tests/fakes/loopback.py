"""Run an ASGI app on 127.0.0.1 with a real uvicorn server in a background thread.

    with serve_app(app) as base_url:        # "http://127.0.0.1:54321"
        httpx.get(base_url + "/v1/models")

The server binds a free port itself (no race between choosing and binding), runs its own event
loop in a daemon thread, and shuts down on exit, waiting for the thread, so tests leave nothing
running and raise no warnings. Works from sync and async tests alike (the test's loop is not
involved).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import uvicorn


class LoopbackServer:
    """A started uvicorn server; ``url`` is its base URL (no trailing slash)."""

    def __init__(
        self,
        app: Any,
        *,
        lifespan: Literal["auto", "on", "off"] = "auto",
        log_level: str = "warning",
        startup_timeout_s: float = 15.0,
    ) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            lifespan=lifespan,
            log_level=log_level,
            loop="asyncio",
            http="h11",
            ws="none",
            access_log=False,
            # Streams still open at shutdown are cut after this, so exit never hangs.
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name=f"loopback-{self.port}",
            daemon=True,
        )
        self._startup_timeout_s = startup_timeout_s

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                self._socket.close()
                raise RuntimeError("loopback server failed to start (see its log)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("loopback server did not start in time")
            time.sleep(0.005)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._socket.close()


@contextmanager
def serve_app(
    app: Any,
    *,
    lifespan: Literal["auto", "on", "off"] = "auto",
    log_level: str = "warning",
    startup_timeout_s: float = 15.0,
) -> Iterator[str]:
    """Serve ``app`` for the duration of the block; yields the base URL."""
    server = LoopbackServer(app, lifespan=lifespan, log_level=log_level,
                            startup_timeout_s=startup_timeout_s)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def free_port() -> int:
    """A port that nothing listens on right now (for "upstream is down" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
