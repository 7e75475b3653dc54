"""Admin routes: read the case records and label them (admin key required when keys are
configured)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from guardrail.cases.model import Action, ReviewLabel, ReviewVerdict
from server.errors import ClientError
from server.services import Services

router = APIRouter(prefix="/admin")

MAX_NOTE_CHARS = 4000


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    services.auth.admin(request)
    return services


def _admin_name(request: Request) -> str:
    """The admin key's name; a dependency, so the key is checked before the body is read."""
    services: Services = request.app.state.services
    return services.auth.admin(request)


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: ReviewVerdict
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS)


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


@router.post("/cases/{case_id}/label")
async def label_case(
    request: Request, case_id: str, body: LabelRequest,
    by: Annotated[str, Depends(_admin_name)],
) -> dict[str, Any]:
    """Stores a review label with the case: the label, the admin key's name, the time."""
    services: Services = request.app.state.services
    review = ReviewLabel(label=body.label, by=by, note=body.note or None)
    case = await services.store.set_review(case_id, review)
    if case is None:
        raise ClientError(404, f"no case with id {case_id!r}", error_type="not_found_error",
                          param="case_id")
    result: dict[str, Any] = case.model_dump()
    return result
