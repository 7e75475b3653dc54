"""API keys. With no keys configured at all the proxy is open (the laptop default, bound to
127.0.0.1); ``server.api_keys`` guards the client routes and ``server.admin_keys`` the admin
ones. An admin key also works on client routes; a client key on admin routes is 403."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request
from starlette.datastructures import Headers

from guardrail.config import ServerConfig
from server.errors import ClientError


def bearer_token(headers: Headers) -> str | None:
    """The key a client sent: ``Authorization: Bearer``, or ``api-key`` / ``x-api-key``
    (Azure-style clients). Keys are only ever read from headers, never from the query string,
    so they cannot reach an access log, which records the path and query."""
    header = headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = headers.get("api-key") or headers.get("x-api-key")
    return api_key.strip() if api_key else None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def is_known_key(token: str, keys: list[str]) -> bool:
    """Constant time: equal-length digests, so timing reveals neither a matching prefix nor a
    key's length, and every key is compared, so it does not reveal which one matched."""
    return key_name(token, [(key, key) for key in keys]) is not None


def key_name(token: str, named: list[tuple[str, str]]) -> str | None:
    """The name of the key ``token`` is, or None; constant time as ``is_known_key``."""
    presented = _digest(token)
    found: str | None = None
    for name, key in named:
        if hmac.compare_digest(presented, _digest(key)):
            found = name
    return found


ANONYMOUS = "anonymous"
"""Who an admin request is when no keys are configured at all."""


class Authenticator:
    def __init__(self, config: ServerConfig) -> None:
        self.api_keys = list(config.api_keys)
        self.named_admin_keys = config.named_admin_keys()
        self.admin_keys = [key for _, key in self.named_admin_keys]

    def client(self, request: Request) -> None:
        if not self.api_keys:
            return
        token = bearer_token(request.headers)
        if token is None:
            raise ClientError(401, "missing API key: send 'Authorization: Bearer <key>'",
                              error_type="authentication_error", code="invalid_api_key")
        if not (is_known_key(token, self.api_keys) or is_known_key(token, self.admin_keys)):
            raise ClientError(401, "invalid API key", error_type="authentication_error",
                              code="invalid_api_key")

    def admin(self, request: Request) -> str:
        """Checks the request's admin key; the key's name (``anonymous`` with auth off)."""
        if not self.admin_keys:
            if not self.api_keys:
                return ANONYMOUS  # no auth configured at all
            raise ClientError(403, "admin routes are disabled: no server.admin_keys configured",
                              error_type="permission_error")
        token = bearer_token(request.headers)
        if token is None:
            raise ClientError(401, "missing admin key: send 'Authorization: Bearer <key>'",
                              error_type="authentication_error", code="invalid_api_key")
        name = key_name(token, self.named_admin_keys)
        if name is not None:
            return name
        if is_known_key(token, self.api_keys):
            raise ClientError(403, "this key may not use admin routes",
                              error_type="permission_error")
        raise ClientError(401, "invalid admin key", error_type="authentication_error",
                          code="invalid_api_key")
