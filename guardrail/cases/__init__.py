"""Case records and their stores, chosen by the scheme of ``store.url``:
``sqlite:///PATH`` (default) or ``postgresql://...``."""

from __future__ import annotations

from guardrail.cases.base import CaseQuery, CaseStore
from guardrail.cases.model import (
    Action,
    Case,
    CaseSummary,
    Correction,
    Flag,
    ReviewLabel,
    StepRecord,
)
from guardrail.cases.scan import CaseScan
from guardrail.config import StoreConfig
from guardrail.errors import ConfigError
from guardrail.registry import Registry

STORES: Registry[CaseStore] = Registry("case store")
STORES.register_lazy("sqlite", "guardrail.cases.sqlite_store:SQLiteCaseStore")
STORES.register_lazy("postgresql", "guardrail.cases.postgres_store:PostgresCaseStore")
STORES.register_lazy("postgres", "guardrail.cases.postgres_store:PostgresCaseStore")


def build_store(config: StoreConfig) -> CaseStore:
    scheme, separator, _ = config.url.partition("://")
    if not separator:
        raise ConfigError(
            f"store.url: expected sqlite:///PATH or postgresql://..., got {config.url!r}"
        )
    return STORES.create(scheme.split("+")[0], config.url)


__all__ = [
    "STORES", "Action", "Case", "CaseQuery", "CaseScan", "CaseStore", "CaseSummary",
    "Correction", "Flag", "ReviewLabel", "StepRecord", "build_store",
]
