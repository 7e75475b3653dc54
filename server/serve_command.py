"""``guardrail serve``: start the OpenAI-compatible proxy."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from guardrail.config import Config, load_config
from guardrail.errors import ConfigError, UnknownBackendError


def _describe_start(config: Config) -> str:
    kind = config.upstream.resolved_kind()
    if kind == "demo":
        upstream = ("demo (no upstream configured: replaying bundled reasoning traces; "
                    "the README lists prompts to try)")
    elif kind == "openai":
        upstream = f"openai-compatible at {config.upstream.url}"
    else:
        upstream = f"litellm model {config.upstream.model}"
    return (f"guardrail: upstream {upstream}; guard {config.guard.kind}; "
            f"mode {config.stream.mode}; correction {config.correction.strategy}; "
            f"cases in {config.store.url.split('@')[-1]}")


def check_backends(config: Config) -> None:
    """Backend names are checked before anything starts, so a misspelt one is reported like
    any other bad value: one line naming the field (the app would only fail in its start-up)."""
    from guardrail.cases import STORES
    from guardrail.correctors import CORRECTORS
    from guardrail.guards import GUARDS

    scheme, separator, _ = config.store.url.partition("://")
    if not separator:
        raise ConfigError(f"store.url: expected sqlite:///PATH or postgresql://..., "
                          f"got {config.store.url!r}")
    scheme = scheme.split("+")[0]
    chosen = (("guard.kind", GUARDS, config.guard.kind),
              ("correction.strategy", CORRECTORS, config.correction.strategy),
              ("store.url", STORES, scheme))
    for field, registry, name in chosen:
        if name not in registry.names():
            raise UnknownBackendError(f"{field}: unknown {registry.concept} {name!r}; "
                                      f"known: {', '.join(registry.names())}")


_THREAD_SWITCH_INTERVAL_S = 0.0005


def serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        overrides = {key: value for key, value in (("host", args.host), ("port", args.port))
                     if value is not None}
        if overrides:
            config.server = config.server.model_copy(update=overrides)
        check_backends(config)
    except ConfigError as error:
        _config_error(error)
        return 2
    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One line per upstream call says nothing the access log does not; warnings still show.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Store writes and CPU guard inference run in worker threads. While the event loop is busy
    # (many streams, or one fast one) a thread that finished waits for the GIL up to the switch
    # interval, 5 ms by default, and a stream's first byte waits on its case write.
    sys.setswitchinterval(_THREAD_SWITCH_INTERVAL_S)
    print(_describe_start(config), file=sys.stderr, flush=True)
    print(f"guardrail: listening on http://{config.server.host}:{config.server.port}/v1",
          file=sys.stderr, flush=True)
    app = create_app(config)
    # A config error found only as the app starts (a backend missing its url, a guard model
    # that cannot load) is reported as one line too, not as a traceback from the lifespan.
    quiet = _QuietStartupFailure(app)
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addFilter(quiet)
    try:
        uvicorn.run(app, host=config.server.host, port=config.server.port, log_level="info")
    except SystemExit:
        startup_error = getattr(app.state, "startup_error", None)
        if startup_error is None:
            raise
        _config_error(startup_error)
        return 2
    finally:
        uvicorn_logger.removeFilter(quiet)
    return 0


def _config_error(error: Exception) -> None:
    message = " ".join(str(error).split())  # one line, whatever the message holds
    print(f"guardrail: config error: {message}", file=sys.stderr, flush=True)


class _QuietStartupFailure(logging.Filter):
    """Drops uvicorn's start-up failure logs once the app recorded a config error."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(self.app.state, "startup_error", None) is None


def add_serve_parser(commands: Any) -> None:
    """Adds ``serve`` to the ``guardrail`` command's subcommands."""
    serve_parser = commands.add_parser("serve", help="start the OpenAI-compatible proxy")
    serve_parser.add_argument("--config", help="YAML config file (default: laptop defaults)")
    serve_parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port (default 8000)")
    serve_parser.set_defaults(handler=serve)
