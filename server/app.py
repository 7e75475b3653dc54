"""The FastAPI application, built by ``create_app(config)``; nothing happens at import time."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware.cors import CORSMiddleware

from guardrail import __version__
from guardrail.config import Config
from guardrail.errors import ConfigError, GuardrailError
from guardrail.metrics import scrape_registry
from guardrail.tracing import Tracer
from server import admin, chat
from server.body_limit import BodyLimitMiddleware
from server.drain import Drain
from server.errors import guardrail_error_response, install_error_handlers
from server.protocol import ChatCompletionRequest
from server.rate_limit import RateLimitMiddleware
from server.services import Services


def _with_chat_body(openapi: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """The chat route reads its body itself (so that bad JSON gets an OpenAI-shaped error),
    which hides the body from FastAPI's schema: describe it from the model the route validates
    against, so clients and schema-driven tests see what it takes."""

    def described() -> dict[str, Any]:
        spec = openapi()  # FastAPI caches it: the second call returns the described one
        operation = spec["paths"]["/v1/chat/completions"]["post"]
        if "requestBody" not in operation:
            body = ChatCompletionRequest.model_json_schema(
                ref_template="#/components/schemas/{model}")
            spec.setdefault("components", {}).setdefault("schemas", {}).update(
                body.pop("$defs", {}))
            operation["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": body}}}
        return spec

    return described


def create_app(
    config: Config | None = None,
    on_fatal: Callable[[GuardrailError], None] | None = None,
    rate_limit_file: Path | None = None,
    *,
    tracer: Tracer | None = None,
) -> FastAPI:
    """``on_fatal`` is told of a start-up error found after the server started listening (a
    guard model that fails to load while it warms up); ``guardrail serve`` stops then.
    ``rate_limit_file``: the rate limit's buckets shared with the other workers.
    ``tracer``: where request traces go; by default what ``config.telemetry`` asks for."""
    config = config or Config()
    drain = Drain()

    def warm_up_failed(error: GuardrailError) -> None:
        app.state.startup_error = error
        if on_fatal is not None:
            on_fatal(error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            services = await Services.start(config, drain, tracer)
        except ConfigError as error:
            # Kept for ``guardrail serve``, which reports it as one line, not a traceback.
            app.state.startup_error = error
            raise
        app.state.services = services
        services.readiness.start(warm_up_failed)
        try:
            yield
        finally:
            await services.aclose()

    app = FastAPI(title="reasoning guardrail", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.drain = drain
    install_error_handlers(app)
    # Starlette runs the last added middleware first: CORS answers preflights before anything
    # else, and a rate-limited request is refused before its body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.server.max_body_bytes)
    if config.server.rate_limit.requests_per_minute is not None:
        app.add_middleware(RateLimitMiddleware, server=config.server,
                           shared_file=rate_limit_file)
    if config.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.server.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["x-guardrail-case-id", "x-request-id"],
        )
    app.include_router(chat.router)
    app.include_router(admin.router)
    app.openapi = _with_chat_body(app.openapi)  # type: ignore[method-assign]

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        services: Services = request.app.state.services
        services.auth.client(request)
        try:
            models = await services.upstream.list_models()
        except GuardrailError as error:
            return guardrail_error_response(error)
        return JSONResponse({"object": "list", "data": models})

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        """Liveness: the process answers. Whether it should get traffic is ``/readyz``."""
        services: Services = request.app.state.services
        return {
            "status": "ok",
            "version": __version__,
            "pid": os.getpid(),  # which worker answered, with ``--workers``
            "upstream": services.upstream.name,
            "guard": services.guard.name,
            "mode": config.stream.mode,
            "correction": services.corrector.name,
            "store": services.store.name,
        }

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        """Readiness: the guard warmed up, the store answers, not draining (else 503)."""
        services: Services = request.app.state.services
        ready, body = await services.readiness.report(services.drain.draining)
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        services: Services = request.app.state.services
        services.sync_stats()
        return Response(generate_latest(scrape_registry(services.metrics.registry)),
                        media_type=CONTENT_TYPE_LATEST)

    return app
