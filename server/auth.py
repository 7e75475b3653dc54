"""API keys. With no keys configured at all the proxy is open (the laptop default, bound to
127.0.0.1); ``server.api_keys`` guards the client routes and ``server.admin_keys`` the admin
ones. An admin key also works on client routes; a client key on admin routes is 403."""

from __future__ import annotations

import hmac

from fastapi import Request

from guardrail.config import ServerConfig
from server.errors import ClientError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = request.headers.get("api-key") or request.headers.get("x-api-key")
    return api_key.strip() if api_key else None


def _known(token: str, keys: list[str]) -> bool:
    # Compare every key in constant time so response timing does not reveal key prefixes.
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in keys)


class Authenticator:
    def __init__(self, config: ServerConfig) -> None:
        self.api_keys = list(config.api_keys)
        self.admin_keys = list(config.admin_keys)

    def client(self, request: Request) -> None:
        if not self.api_keys:
            return
        token = _bearer(request)
        if token is None:
            raise ClientError(401, "missing API key: send 'Authorization: Bearer <key>'",
                              error_type="authentication_error", code="invalid_api_key")
        if not (_known(token, self.api_keys) or _known(token, self.admin_keys)):
            raise ClientError(401, "invalid API key", error_type="authentication_error",
                              code="invalid_api_key")

    def admin(self, request: Request) -> None:
        if not self.admin_keys:
            if not self.api_keys:
                return  # no auth configured at all
            raise ClientError(403, "admin routes are disabled: no server.admin_keys configured",
                              error_type="permission_error")
        token = _bearer(request)
        if token is None:
            raise ClientError(401, "missing admin key: send 'Authorization: Bearer <key>'",
                              error_type="authentication_error", code="invalid_api_key")
        if _known(token, self.admin_keys):
            return
        if _known(token, self.api_keys):
            raise ClientError(403, "this key may not use admin routes",
                              error_type="permission_error")
        raise ClientError(401, "invalid admin key", error_type="authentication_error",
                          code="invalid_api_key")
