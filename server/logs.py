"""Logs: the per-request line, and the JSON format (``server.log_format: json``).

Every chat completion ends in one ``chat_completion`` record (case id, request id, status,
action, durations) from ``log_response``. In JSON every record is one object per line: the
fields of the record, never a header (so never an API key), and with ``store.redact`` on never
text: the request line's error is reduced to its kind, and an exception is logged as its type
and stack, without its message (messages of parsing or upstream errors can quote input).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import traceback
from typing import Any

from guardrail.cases.model import Case

logger = logging.getLogger("guardrail.requests")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

# What logging puts on every record; anything else on a record is a field someone added.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "color_message", "taskName"}


def request_id(header: str | None) -> str:
    """The client's ``x-request-id`` when it is a plain token, else a new one: a made-up header
    must not inject into the logs."""
    if header is not None and _CLIENT_REQUEST_ID.fullmatch(header):
        return header
    return "req_" + secrets.token_hex(12)


def log_response(case: Case, request_id: str, status_code: int, *, redact_text: bool) -> None:
    """The one line a chat completion leaves in the log, when it has ended and been stored."""
    error = case.error
    if error is not None and redact_text:
        error = error.split(":", 1)[0]  # the error's kind; its message may quote text
    fields: dict[str, Any] = {
        "event": "chat_completion", "case_id": case.id, "request_id": request_id,
        "status": status_code, "action": case.action, "stream": case.stream,
        "model": case.model, "flagged": len(case.flagged), "corrections": len(case.corrections),
        "total_ms": _ms(case.timings.total_ms),
        "first_token_ms": _ms(case.timings.upstream_first_token_ms),
        "guard_ms": _ms(case.timings.guard_total_ms), "error": error,
    }
    logger.info("chat completion %s %s: %s %s", case.id, request_id, status_code, case.action,
                extra=fields)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, redact_text: bool = False) -> None:
        super().__init__()
        self.redact_text = redact_text

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "pid": record.process,
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) \
                and len(record.args) == 5:
            # Fields, not uvicorn's sentence; the path without its query (a client may put
            # anything there, a key included).
            client, method, path, _, status = record.args
            entry.update(event="http_request", client=client, method=method,
                         path=str(path).split("?", 1)[0], status=status)
        else:
            entry["message"] = record.getMessage()
            entry.update({key: value for key, value in vars(record).items()
                          if key not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:
            kind, error, trace = record.exc_info
            entry["exception"] = kind.__name__
            if self.redact_text:
                entry["stack"] = "".join(traceback.format_tb(trace))
            else:
                entry["stack"] = "".join(traceback.format_exception(kind, error, trace))
        return json.dumps(entry, ensure_ascii=False, default=str)


def json_logging_config(*, redact_text: bool) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``server.log_format: json``, uvicorn's loggers
    included: every record through one stderr handler, one JSON object per line."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter, "redact_text": redact_text}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json",
                              "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["json"], "level": "INFO"},
        "loggers": {
            # uvicorn's own handlers are replaced: its records reach the root's.
            "uvicorn": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.error": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "INFO", "propagate": True},
            # One line per upstream call says nothing the access log does not.
            "httpx": {"level": "WARNING"},
        },
    }
