"""Admin routes: read the case records (admin key required when keys are configured)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from guardrail.cases.model import Action
from server.errors import ClientError
from server.services import Services

router = APIRouter(prefix="/admin")


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    services.auth.admin(request)
    return services


@router.get("/cases")
async def list_cases(
    request: Request,
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    action: Action | None = None,
) -> dict[str, Any]:
    services = _services(request)
    cases = await services.store.list(limit=limit, offset=offset, action=action)
    return {"object": "list", "data": [case.model_dump() for case in cases]}


@router.get("/cases/{case_id}")
async def get_case(request: Request, case_id: str) -> dict[str, Any]:
    services = _services(request)
    case = await services.store.get(case_id)
    if case is None:
        raise ClientError(404, f"no case with id {case_id!r}", error_type="not_found_error",
                          param="case_id")
    body: dict[str, Any] = case.model_dump()
    return body


