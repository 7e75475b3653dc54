"""``guardrail serve``: start the OpenAI-compatible proxy."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError

from guardrail.config import Config, load_config
from guardrail.errors import ConfigError, UnknownBackendError

logger = logging.getLogger("guardrail.serve")


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


def serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        overrides = {key: value for key, value in (("host", args.host), ("port", args.port),
                                                   ("workers", args.workers))
                     if value is not None}
        if overrides:
            config.server = config.server.model_validate(
                {**config.server.model_dump(), **overrides})
        check_backends(config)
    except ConfigError as error:
        _config_error(error)
        return 2
    except ValidationError as error:  # --workers 0
        first = error.errors()[0]
        _config_error(ConfigError(f"server.{first['loc'][0]}: {first['msg']}"))
        return 2
    from server.process import WorkerSupervisor, configure_logging, run_server

    configure_logging(config)
    workers = config.server.workers
    for line in (_describe_start(config),
                 f"guardrail: listening on http://{config.server.host}:{config.server.port}/v1"
                 + (f" with {workers} worker processes" if workers > 1 else "")):
        if config.server.log_format == "json":  # every line of the log an object
            logger.info(line.removeprefix("guardrail: "))
        else:
            print(line, file=sys.stderr, flush=True)
    if workers > 1:
        startup_error = WorkerSupervisor(config, workers).run()
        if startup_error is not None:
            _config_error(startup_error)
            return 2
        return 0
    server = run_server(config)
    if server.startup_error is not None:
        # A config error found only as the app starts (a backend missing its url, a guard model
        # that cannot load) is reported as one line too, not as a traceback from the lifespan.
        _config_error(server.startup_error)
        return 2
    if not server.started:
        return 1  # uvicorn said why (the port taken...)
    return 0


def _config_error(error: Exception | str) -> None:
    message = " ".join(str(error).split())  # one line, whatever the message holds
    print(f"guardrail: config error: {message}", file=sys.stderr, flush=True)


def add_serve_parser(commands: Any) -> None:
    """Adds ``serve`` to the ``guardrail`` command's subcommands."""
    serve_parser = commands.add_parser("serve", help="start the OpenAI-compatible proxy")
    serve_parser.add_argument("--config", help="YAML config file (default: laptop defaults)")
    serve_parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port (default 8000)")
    serve_parser.add_argument("--workers", type=int,
                              help="worker processes sharing the port (default server.workers, 1)")
    serve_parser.set_defaults(handler=serve)
