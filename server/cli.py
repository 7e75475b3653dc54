"""``guardrail``: the command line. ``guardrail serve`` starts the proxy."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from guardrail.config import Config, load_config
from guardrail.errors import ConfigError


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


def serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        overrides = {key: value for key, value in (("host", args.host), ("port", args.port))
                     if value is not None}
        if overrides:
            config.server = config.server.model_copy(update=overrides)
    except ConfigError as error:
        print(f"guardrail: config error: {error}", file=sys.stderr)
        return 2
    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(_describe_start(config), file=sys.stderr, flush=True)
    print(f"guardrail: listening on http://{config.server.host}:{config.server.port}/v1",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(config), host=config.server.host, port=config.server.port,
                    log_level="info")
    except ConfigError as error:
        print(f"guardrail: config error: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardrail",
                                     description="Guard a reasoning model's stream, step by step.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="start the OpenAI-compatible proxy")
    serve_parser.add_argument("--config", help="YAML config file (default: laptop defaults)")
    serve_parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port (default 8000)")
    serve_parser.set_defaults(handler=serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    result: int = handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
