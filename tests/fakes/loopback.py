"""Run an ASGI app on 127.0.0.1 with a real uvicorn server in a background thread.

    with serve_app(app) as base_url:        # "http://127.0.0.1:54321"
        httpx.get(base_url + "/v1/models")

The server binds a free port itself (no race between choosing and binding), runs its own event
loop in a daemon thread, and shuts down on exit, waiting for the thread, so tests leave nothing
running and raise no warnings. Works from sync and async tests alike (the test's loop is not
involved).

Several servers for one test (a proxy and its fakes) go in one ``LoopbackServers`` group, which
stops them together: a uvicorn shutdown takes 0.1-0.2 s of polling and grace sleeps whatever the
server does, so stopping three one after another costs three times that.

    with LoopbackServers() as servers:
        upstream_url = servers.serve(upstream_app)
        proxy_url = servers.serve(create_app(config))
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
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
        self.request_stop()
        self.wait_stopped()

    def request_stop(self) -> None:
        """Tell the server to shut down, without waiting for it (see ``stop_together``)."""
        self._server.should_exit = True

    def wait_stopped(self, timeout_s: float = 10.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        self._socket.close()


def stop_together(servers: Iterable[LoopbackServer]) -> None:
    """Stop servers concurrently: all are told first, then all are waited for, so the group
    takes one shutdown's time rather than the sum."""
    started = list(servers)
    for server in started:
        server.request_stop()
    for server in started:
        server.wait_stopped()


class LoopbackServers:
    """A group of loopback servers for one test, stopped together when the block ends."""

    def __init__(self) -> None:
        self._servers: list[LoopbackServer] = []

    def serve(
        self,
        app: Any,
        *,
        lifespan: Literal["auto", "on", "off"] = "auto",
        log_level: str = "warning",
        startup_timeout_s: float = 15.0,
    ) -> str:
        """Start serving ``app`` now, until the group stops; returns its base URL."""
        server = LoopbackServer(app, lifespan=lifespan, log_level=log_level,
                                startup_timeout_s=startup_timeout_s)
        server.start()
        self._servers.append(server)
        return server.url

    def stop(self) -> None:
        servers, self._servers = self._servers, []
        stop_together(servers)

    def __enter__(self) -> LoopbackServers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


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
