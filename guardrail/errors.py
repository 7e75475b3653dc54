"""One exception tree for the whole library. The server translates these at its edge into
OpenAI-shaped error bodies (or, inside a started stream, an error event then ``[DONE]``)."""

from __future__ import annotations


class GuardrailError(Exception):
    """Base of every error the library raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None


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
