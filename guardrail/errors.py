"""One exception tree for the whole library. The server translates these at its edge into
OpenAI-shaped error bodies (or, inside a started stream, an error event then ``[DONE]``)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class GuardrailError(Exception):
    """Base of every error the library raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None


class InternalError(GuardrailError):
    """An exception that is not one of ours, raised while a response was produced (a bug in a
    backend or in the proxy). The client is told only its type; ``detail`` has the rest, for
    the case record and the log."""

    code = "internal_error"

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


def internal_error(error: BaseException) -> GuardrailError:
    """The one place an exception joins this tree: ours pass as they are; any other is logged
    whole, once, and becomes an :class:`InternalError` naming its type."""
    if isinstance(error, GuardrailError):
        return error
    logger.error("unexpected %s while producing a response", type(error).__name__,
                 exc_info=error)
    return InternalError(f"internal error in the guardrail proxy ({type(error).__name__})",
                         detail=f"{type(error).__name__}: {error}")


def describe(error: BaseException) -> str:
    """How a case records an error: its type and message (the whole detail for ours)."""
    if isinstance(error, InternalError):
        return f"InternalError: {error.detail}"
    return f"{type(error).__name__}: {error}"


class ConfigError(GuardrailError):
    """The configuration is invalid; the message names the field."""


class UnknownBackendError(ConfigError):
    """A backend name that no registry knows; the message lists the known ones."""


class UpstreamError(GuardrailError):
    """The model upstream failed. ``status_code`` is what the proxy answers with."""

    status_code = 502
    error_type = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached (connection refused, DNS, connect timeout)."""

    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """The upstream stopped answering within the configured timeout."""

    status_code = 504
    code = "upstream_timeout"


class UpstreamHTTPError(UpstreamError):
    """The upstream answered with an HTTP error. Client mistakes it reports (4xx) are passed on
    with their status; its own failures (5xx) become 502."""

    code = "upstream_http_error"

    def __init__(self, message: str, upstream_status: int) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status
        if 400 <= upstream_status < 500 and upstream_status not in (401, 403):
            # The client's request was bad (unknown model, too many tokens): say so as such.
            self.status_code = upstream_status
            self.error_type = "invalid_request_error"


class UpstreamStreamBroken(UpstreamError):
    """The upstream stream ended abnormally after it had started."""

    code = "upstream_stream_broken"


class GuardError(GuardrailError):
    """A guard backend failed or timed out; handled per ``guard.on_error``."""

    code = "guard_error"


class StoreError(GuardrailError):
    """The case store failed to read or write."""

    code = "store_error"


class Unavailable(GuardrailError):
    """The proxy cannot take the request now; the client may retry (``retry_after_s``)."""

    status_code = 503
    error_type = "server_error"
    retry_after_s: int = 1


class NotReady(Unavailable):
    """The guard is still loading, or failed to."""

    code = "not_ready"


class ShuttingDown(Unavailable):
    """The process is draining for a shutdown: new requests go elsewhere, and a stream still
    running at the drain deadline ends with this."""

    code = "shutting_down"
