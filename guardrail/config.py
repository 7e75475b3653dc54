"""The one configuration: a YAML file validated by pydantic. Every field has a default that runs
on a laptop; ``${VAR}`` (or ``${VAR:-default}``) reads secrets from the environment."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from guardrail.errors import ConfigError

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Section(BaseModel):
    # A misspelt key is a mistake the user wants to hear about, not silently ignore.
    model_config = ConfigDict(extra="forbid")


class UpstreamConfig(_Section):
    kind: Literal["auto", "openai", "litellm", "demo"] = "auto"
    """``auto``: ``demo`` without a url or model, ``openai`` with a url, ``litellm`` with only a
    model string (``deepseek/deepseek-reasoner``, ``bedrock/...``)."""
    url: str | None = None
    """Base URL of an OpenAI-compatible server, e.g. ``http://127.0.0.1:8001/v1``."""
    model: str | None = None
    """Model sent upstream; requests naming another model are rewritten only if this is set."""
    api_key: str | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=300.0, gt=0)
    """Longest silence tolerated between two streamed chunks."""
    max_connections: int | None = Field(default=None, ge=1)
    """Upstream requests in flight at once (per worker); None = no limit, the model server
    queues. A request over the limit waits up to ``connect_timeout_s`` for a free one."""
    think_start: Literal["auto", "reasoning", "answer"] = "auto"
    """Where inline content begins when the upstream does not split reasoning into its own field:
    ``reasoning`` for R1-style templates that put ``<think>`` in the prompt, ``answer`` for
    models that never think, ``auto`` to decide from the tags (untagged leading text is held
    until a ``</think>`` or the end shows what it was)."""

    def resolved_kind(self) -> Literal["openai", "litellm", "demo"]:
        if self.kind != "auto":
            return self.kind
        if self.url:
            return "openai"
        if self.model:
            return "litellm"
        return "demo"


class GuardConfig(_Section):
    kind: str = "embedded"
    runner: Literal["auto", "transformers", "endpoint", "vllm"] = "auto"
    """How a generative guard's model runs: ``auto`` is ``endpoint`` with ``url`` and
    ``transformers`` (in-process) without; ``vllm`` runs it in-process on vLLM. Only the
    generative kinds take one."""
    url: str | None = None
    model: str | None = None
    api_key: str | None = None
    on_error: Literal["block", "allow"] = "block"
    timeout_s: float = Field(default=10.0, gt=0)
    """Longest the guard may work on one check (or one ``check_many`` call): a guard that
    takes longer is stuck or broken, and ``on_error`` decides."""
    max_queue_wait_s: float = Field(default=60.0, ge=0)
    """Time a check waits in the guard's queue behind other checks (load, not failure) is not
    counted against ``timeout_s``, up to this much; 0 counts it as before. Only guards whose
    queue marks the wait tell it apart (micro-batches in-process, an endpoint guard's connection
    slots and batched requests)."""
    threshold: float = Field(default=0.5, ge=0, le=1)
    """A step is unsafe when its score reaches this (for guards that give a score)."""
    window_steps: int = Field(default=1, ge=0)
    """Earlier steps shown to the guard with each step: bounded, so cost grows linearly (with
    the default steps, about 2.7 guard tokens per trace token: benchmarks/guard_growth.py)."""
    max_request_chars: int = Field(default=2000, ge=1)
    max_concurrency: int = Field(default=4, ge=1)
    """Checks in flight at once for one stream."""
    compliance_cues: bool = True
    """Also flag a step that commits to carrying out a request the guard judges harmful (IPO's
    compliance cue), so the cut comes at the commitment rather than at the first specifics."""
    refusal_rule: bool = True
    """Never cut a sentence that declines or redirects ("I can't help with that"): it is taken
    out of the step before the guard judges the rest (``guardrail/refusals.py``). Guards often
    score refusals that name the harm as the harm, and cutting them makes corrections loop."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Settings only one backend understands (``device``, ``batch_size``, ``controversial``,
    a cascade's stages, a judge's prompt...); each backend validates its own and names the
    offending ``guard.options.<key>``."""


class StreamConfig(_Section):
    mode: Literal["strict", "fast"] = "strict"
    split: Literal["sentence", "paragraph"] = "sentence"
    max_step_chars: int = Field(default=600, ge=16)
    min_step_chars: int = Field(default=120, ge=0)
    """Shorter sentences are joined with the next one, so the guard sees enough to judge and
    each check carries enough new text to keep guard cost per trace token low."""


DEFAULT_REFUSAL = (
    "I can't help with that. If you have a related question that doesn't involve causing harm, "
    "I'm happy to help."
)


class RewriteConfig(_Section):
    """The corrector model for ``correction.strategy: rewrite`` (and the rewrite fallback)."""

    model: str | None = None
    """A LiteLLM model string, e.g. ``openai/gpt-4.1`` or ``deepseek/deepseek-chat``."""
    url: str | None = None
    api_key: str | None = None
    max_tokens: int = Field(default=2048, ge=1)


class CorrectionConfig(_Section):
    strategy: str = "intervene"
    """``refuse``, ``block``, ``intervene`` (cut, insert a safety trigger, let the same model go
    on) or ``rewrite`` (a corrector model writes the rest)."""
    refusal_message: str = DEFAULT_REFUSAL
    max_rounds: int = Field(default=3, ge=0)
    """Correction rounds in one response; a flag after the last one ends in a refusal."""
    continuation: Literal["auto", "vllm", "deepseek-prefix", "completions", "restart", "none"] = (
        "auto"
    )
    """How ``intervene`` asks the model to go on: ``vllm`` (``continue_final_message``),
    ``deepseek-prefix`` (DeepSeek's beta prefix mode), ``completions`` (``/v1/completions`` with
    the chat template rendered here), ``restart`` (a fresh request with an introspection
    instruction, as CARE does), ``none`` (use ``fallback``). ``auto`` picks from the upstream."""
    fallback: Literal["refuse", "rewrite"] = "refuse"
    """What ``intervene`` does when the upstream cannot continue."""
    chat_template: str | None = None
    """For ``completions``: a known template (``deepseek-r1-distill``, ``qwen3``) or a path to a
    Jinja file; by default guessed from the model name."""
    continuation_url: str | None = None
    """Base URL for continuations if not the upstream's (DeepSeek's prefix mode lives under
    ``/beta``; derived from ``upstream.url`` when unset)."""
    triggers: list[str] = Field(default_factory=list)
    """Safety triggers; empty = the built-in pool (IPO-style)."""
    category_triggers: dict[str, list[str]] = Field(default_factory=dict)
    """Triggers for a guard category (``S11`` or ``self-harm``), tried before the pool."""
    refuse_categories: list[str] = Field(default_factory=lambda: ["S4"])
    """Categories refused outright, never continued (child sexual exploitation by default)."""
    rewrite: RewriteConfig = Field(default_factory=RewriteConfig)


class StoreConfig(_Section):
    url: str = "sqlite:///data/cases.db"
    fallback_path: str = "data/cases-unstored.jsonl"
    """Where a case goes if the store cannot take it, so that no record is lost."""
    redact: list[str] = Field(default_factory=list)
    """Case fields blanked before a case is stored (``request``, ``steps.text``, ``withheld``...,
    see ``guardrail.cases.redact.REDACTABLE``), for deployments that may not keep user text."""

    @field_validator("redact")
    @classmethod
    def _known_fields(cls, value: list[str]) -> list[str]:
        # Imported here: guardrail.cases imports this module, and the names live with the code
        # that blanks them, so the two cannot drift apart.
        from guardrail.cases.redact import REDACTABLE

        unknown = [name for name in value if name not in REDACTABLE]
        if unknown:
            raise ValueError(f"unknown case field(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(REDACTABLE)}")
        return value


class RateLimitConfig(_Section):
    """A token bucket per API key (per client address when auth is off) on chat completions."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    """None = no limit."""
    burst: int | None = Field(default=None, ge=1)
    """Requests allowed at once after a quiet spell; by default ``requests_per_minute``."""


class BackpressureConfig(_Section):
    """Admission control: while the guard is too far behind, a new chat request is refused
    (503 with ``Retry-After``) before any text is sent, so that the streams already running keep
    their checks within ``guard.timeout_s``."""

    enabled: bool = True
    max_guard_wait_s: float | None = Field(default=None, gt=0)
    """Refuse while a new check would wait longer than this for the guard; None = a quarter of
    ``guard.timeout_s``, leaving the rest for the checks of streams already admitted."""
    max_guard_backlog: int | None = Field(default=None, ge=1)
    """Also refuse while this many checks are in the guard; None = no bound on the count."""
    checks_per_new_stream: float | None = Field(default=None, ge=0)
    """Checks a stream admitted but not yet checking is counted as, so that a burst of new
    requests is not all admitted against an idle guard before the first of them has sent a
    check; None = as many as the streams sending checks have in the guard now, each (between 1
    and ``guard.max_concurrency``; ``guard.max_concurrency`` while no stream is)."""


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    admin_keys: list[str] | dict[str, str] = Field(default_factory=list)
    """Keys for ``/admin``: a list (named ``admin-key-1``, ``admin-key-2``... in order) or a
    mapping name -> key. The name, never the key, is what a review label records as its
    author."""
    reasoning_field: Literal["reasoning_content", "reasoning", "both", "hidden"] = (
        "reasoning_content"
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    cors_origins: list[str] = Field(default_factory=list)
    """Browser origins allowed to call the proxy; empty = no CORS headers at all."""
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    workers: int = Field(default=1, ge=1)
    """Worker processes sharing the port (``guardrail serve --workers``); each loads its own
    guard, they share the rate limit's buckets, ``/metrics`` sums them all."""
    drain_seconds: float = Field(default=25.0, ge=0)
    """On SIGTERM: how long streams in flight may take to finish while new requests get 503
    and ``/readyz`` says not ready; streams still running then are ended with an error event
    and their case recorded. Below Kubernetes' default 30 s grace period, so the drain ends
    before the kill."""
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line (the request log with case id, request id, status
    and durations; never API keys, and no request or model text when ``store.redact`` is on)."""
    backpressure: BackpressureConfig = Field(default_factory=BackpressureConfig)

    @field_validator("admin_keys")
    @classmethod
    def _named_keys(cls, value: list[str] | dict[str, str]) -> list[str] | dict[str, str]:
        if isinstance(value, dict) and any(not name.strip() for name in value):
            raise ValueError("an admin key's name must not be empty")
        keys = value.values() if isinstance(value, dict) else value
        if any(not key for key in keys):
            raise ValueError("an admin key must not be empty")
        return value

    def named_admin_keys(self) -> list[tuple[str, str]]:
        """``(name, key)`` for every admin key."""
        if isinstance(self.admin_keys, dict):
            return list(self.admin_keys.items())
        return [(f"admin-key-{number}", key)
                for number, key in enumerate(self.admin_keys, start=1)]


class TelemetryConfig(_Section):
    """OpenTelemetry traces (the ``otel`` extra). Off unless an endpoint is set here or in the
    standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    variables; the other ``OTEL_*`` variables (headers, sampler, resource) apply as usual."""

    otlp_endpoint: str | None = None
    """An OTLP/HTTP collector's base URL, e.g. ``http://otel-collector:4318``; spans go to
    ``<endpoint>/v1/traces``."""
    service_name: str | None = None
    """``service.name`` of the spans; by default ``OTEL_SERVICE_NAME``, else
    ``reasoning-guardrail``."""


class Config(_Section):
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    correction: CorrectionConfig = Field(default_factory=CorrectionConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)


def expand_env(value: Any, path: str = "") -> Any:
    """Replace ``${VAR}`` in every string; a missing variable without a default is an error."""
    if isinstance(value, dict):
        return {key: expand_env(item, f"{path}.{key}" if path else str(key))
                for key, item in value.items()}
    if isinstance(value, list):
        return [expand_env(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            # As in the shell and docker compose: ``:-`` uses the default when unset or empty.
            if default is not None and not found:
                return default
            if found is None:
                raise ConfigError(f"{path}: environment variable {name} is not set")
            return found

        return _ENV_REFERENCE.sub(substitute, value)
    return value


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(top level)"
    count = error.error_count()
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"{field}: {first['msg']}{more}"


def config_from_mapping(data: Any) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("(top level): expected a mapping of sections")
    try:
        return Config.model_validate(expand_env(data))
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's message spans several lines; the start-up error must be one."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; ``None`` gives the laptop defaults."""
    if path is None:
        return Config()
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{file}: cannot read ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML ({_yaml_problem(error)})") from None
    try:
        return config_from_mapping(data)
    except ConfigError as error:
        raise ConfigError(f"{file}: {error}") from None
