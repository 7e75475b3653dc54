"""Every error becomes an OpenAI-shaped body here, at the edge: one place, one shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from guardrail.errors import GuardrailError, Unavailable
from server.protocol import error_body

logger = logging.getLogger(__name__)


class ClientError(Exception):
    """A mistake in the client's request (4xx)."""

    def __init__(
        self, status_code: int, message: str, *, error_type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code


def error_response(
    status_code: int, message: str, error_type: str, *, param: str | None = None,
    code: str | None = None, headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, error_type, param=param, code=code),
        status_code=status_code,
        headers=headers,
    )


def guardrail_error_response(
    error: GuardrailError, headers: dict[str, str] | None = None
) -> JSONResponse:
    if isinstance(error, Unavailable):
        headers = {**(headers or {}), "retry-after": str(error.retry_after_s)}
    return error_response(
        error.status_code, str(error), error.error_type, code=error.code, headers=headers
    )


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientError)
    async def client_error(_: Request, error: ClientError) -> JSONResponse:
        return error_response(error.status_code, error.message, error.error_type,
                              param=error.param, code=error.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"] if part != "body")
        return error_response(400, f"{location or 'body'}: {first['msg']}",
                              "invalid_request_error", param=location or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        error_type = _STATUS_TYPES.get(error.status_code, "invalid_request_error")
        return error_response(error.status_code, str(error.detail), error_type,
                              headers=getattr(error, "headers", None))

    @app.exception_handler(GuardrailError)
    async def guardrail_error(_: Request, error: GuardrailError) -> JSONResponse:
        return guardrail_error_response(error)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return error_response(500, "internal error in the guardrail proxy", "server_error")
