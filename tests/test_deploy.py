"""The deployment files (Dockerfile, deploy/): the compose file wires what it says, the proxy's
config in it loads, the alert rules pass promtool (checked and unit-tested), and the dashboard
matches its schema and queries only metrics the proxy exposes.

No image is built here (no registry, often no Docker daemon): the Dockerfile is checked as text.
``docker compose config`` (or Debian's ``docker-compose``) validates the compose file where one is
installed; promtool (Debian's ``prometheus`` package, which ``.ci/run`` installs) runs the rules;
both skip, saying so, where absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from guardrail.config import Config, load_config
from guardrail.guards.passthrough import PassThroughGuard
from guardrail.guards.plumbing.stats import GuardStatsCollector
from guardrail.metrics import Metrics
from server.backpressure import AdmissionGate, BackpressureGauges
from server.serve_command import check_backends
from tests.proxy_harness import running_proxy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
DASHBOARD_SCHEMA = DEPLOY / "grafana" / "dashboard.schema.json"
# What deploy/.env supplies (compose refuses to start without them).
COMPOSE_ENV = {"POSTGRES_PASSWORD": "pw", "GUARDRAIL_API_KEY": "client-key",
               "GUARDRAIL_ADMIN_KEY": "admin-key", "GRAFANA_ADMIN_PASSWORD": "pw",
               "MODEL": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
               "GUARD_MODEL": "meta-llama/Llama-Guard-3-1B"}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


# -- the compose file ----------------------------------------------------------------------------


def test_compose_wires_the_stack() -> None:
    services = compose()["services"]
    assert set(services) == {"model", "guard-model", "postgres", "proxy", "prometheus",
                             "grafana"}
    for name, service in services.items():
        assert "image" in service, f"{name} names no image"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # a bind mount: the file or folder is checked in
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    for name in ("model", "guard-model"):
        assert services[name]["image"].startswith("vllm/vllm-openai:")
        assert "/health" in " ".join(services[name]["healthcheck"]["test"])
    proxy = services["proxy"]
    assert (DEPLOY / proxy["build"]["context"] / proxy["build"]["dockerfile"]).is_file()
    assert proxy["build"]["args"]["TORCH_VARIANT"].endswith(":-cpu}")
    assert proxy["depends_on"] == {name: {"condition": "service_healthy"}
                                   for name in ("model", "guard-model", "postgres")}
    # Every service waited on as healthy says how its health is known.
    for name, service in services.items():
        for needed, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[needed], f"{name} waits on {needed}'s health"
    assert "/readyz" in " ".join(proxy["healthcheck"]["test"])
    # Longer than the drain, so docker stop lets responses in flight finish.
    assert int(proxy["stop_grace_period"].removesuffix("s")) > Config().server.drain_seconds
    ports = {name: [str(port) for port in service.get("ports", [])]
             for name, service in services.items()}
    assert ports["proxy"] == ["${GUARDRAIL_PORT:-8000}:8000"]
    assert ports["prometheus"] == ["${PROMETHEUS_PORT:-9090}:9090"]
    assert ports["grafana"] == ["${GRAFANA_PORT:-3000}:3000"]
    assert not ports["postgres"] and not ports["model"]  # reached inside the network only


def test_the_proxy_config_in_compose_loads_and_points_at_its_services(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in COMPOSE_ENV.items():
        monkeypatch.setenv(name, value)
    config = load_config(DEPLOY / "guardrail.yaml")
    check_backends(config)
    services = compose()["services"]
    mounted = [volume for volume in services["proxy"]["volumes"]
               if volume.startswith("./guardrail.yaml:")]
    assert mounted and mounted[0].split(":")[1] in services["proxy"]["command"]
    for url, service in ((config.upstream.url, "model"), (config.guard.url, "guard-model"),
                         (config.store.url, "postgres")):
        assert url is not None and urlsplit(url).hostname == service
        assert service in services
    assert config.store.url.startswith("postgresql://")
    assert config.guard.kind == "llama-guard"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8000)
    assert config.server.api_keys == ["client-key"]
    assert config.server.named_admin_keys() == [("operator", "admin-key")]
    # Prometheus scrapes the proxy by its compose name and port.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["proxy:8000"]
    assert job["metrics_path"] == "/metrics"


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_accepts_the_file() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {**os.environ, **COMPOSE_ENV}
    result = subprocess.run([*command, "-f", str(COMPOSE), "config", "-q"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    # Without the secrets it refuses, naming the one missing.
    bare = {key: value for key, value in os.environ.items() if key not in COMPOSE_ENV}
    result = subprocess.run([*command, "-f", str(COMPOSE), "config", "-q"], env=bare,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "deploy/.env" in result.stderr


# -- the Dockerfile ------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_the_dockerfile_builds_a_non_root_cpu_image_of_guardrail_serve() -> None:
    instructions = _instructions((ROOT / "Dockerfile").read_text())
    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    final = instructions[max(i for i, (keyword, _) in enumerate(instructions)
                             if keyword == "FROM"):]
    final_keywords = dict(final)
    assert final_keywords["USER"] not in {"root", "0"}
    assert json.loads(final_keywords["ENTRYPOINT"]) == ["guardrail", "serve"]
    assert "/healthz" in final_keywords["HEALTHCHECK"]
    assert final_keywords["EXPOSE"] == "8000"
    assert "0.0.0.0" in json.loads(final_keywords["CMD"])
    assert ("COPY", "--from=build /opt/guardrail /opt/guardrail") in final
    assert ("ARG", "TORCH_VARIANT=cpu") in instructions
    [torch] = [rest for keyword, rest in instructions
               if keyword == "RUN" and "download.pytorch.org/whl/${TORCH_VARIANT}" in rest]
    assert "constraints/cpu.txt" in torch
    # Every file the build copies exists and is not shut out by .dockerignore.
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for keyword, rest in instructions:
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


def test_the_health_checks_pass_on_a_running_proxy_and_fail_without_one(
        tmp_path: Path) -> None:
    """The image's HEALTHCHECK and the compose one, run as written against a real proxy (only
    its address changed)."""
    instructions = dict(_instructions((ROOT / "Dockerfile").read_text()))
    image_check = json.loads(instructions["HEALTHCHECK"].split(" CMD ", 1)[1])
    compose_check = compose()["services"]["proxy"]["healthcheck"]["test"][1:]
    with running_proxy(tmp_path) as proxy:
        deadline = time.monotonic() + 30
        while proxy.client.get("/readyz").status_code != 200:  # the guard warms up
            assert time.monotonic() < deadline, "the proxy never became ready"
            time.sleep(0.05)
        for command in (image_check, compose_check):
            assert command[0] == "python"
            code = command[2].replace("http://127.0.0.1:8000", proxy.url)
            assert code != command[2]
            ran = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30,
                                 check=False)
            assert ran.returncode == 0, ran.stderr
    for command in (image_check, compose_check):
        code = command[2].replace("http://127.0.0.1:8000", "http://127.0.0.1:9")
        ran = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30,
                             check=False)
        assert ran.returncode != 0


# -- alert rules ---------------------------------------------------------------------------------


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; .ci/run "
                    "installs it)")
    return found


def test_promtool_checks_the_alert_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_the_alerts() -> None:
    tested = {test["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for test in case.get("alert_rule_test", [])}
    assert len(tested) >= 2
    result = subprocess.run([_promtool(), "test", "rules", ALERT_TESTS.name],
                            cwd=ALERT_TESTS.parent, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- queries name only what the proxy exposes ----------------------------------------------------

# Target labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "inf", "nan"}


class _Stats:
    name = "cascade"

    def stats(self) -> dict[str, int]:
        return {"escalated": 1}


def exposed_series() -> dict[str, set[str]]:
    """Every series name ``/metrics`` can show, with its label names: each collector in
    ``guardrail.metrics`` given a child so that its samples appear, a guard's own counters
    (``GuardStatsCollector``) and the backpressure gauges (``server/backpressure.py``)."""
    metrics = Metrics()
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            names = collector._labelnames  # what .labels() takes
            if names:
                collector.labels(*["x"] * len(names))
    metrics.registry.register(GuardStatsCollector(_Stats()))
    # The guard's backlog, as the gauges several workers publish (the single-process collector
    # yields the same names).
    BackpressureGauges(AdmissionGate(Config(), PassThroughGuard(), metrics), metrics.registry)
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """The series a PromQL expression selects: (metric name, label names it matches on)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values cannot name anything
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges: [5m], [$__rate_interval]
    # Grouping clauses name labels, not metrics: sum by (guard) (...) -> sum (...)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    found = []
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?", text):
        name, braces = match.group(1), match.group(2)
        follows = text[match.end():].lstrip()
        if name.lower() in PROMQL_WORDS or (follows.startswith("(") and braces is None):
            continue  # an operator, or a function's name
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", braces or ""))
        found.append((name, labels))
    return found


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^()]*)\)", expr):
        labels.update(label.strip() for label in group.split(",") if label.strip())
    return labels


def unknown_names(expr: str, known: dict[str, set[str]],
                  also: frozenset[str] = frozenset()) -> list[str]:
    """What ``expr`` names that the proxy does not expose: metrics, matched labels, labels it
    groups by."""
    problems = []
    chosen = selectors(expr)
    if not chosen:
        problems.append("selects no metric")
    available = set(TARGET_LABELS)
    for name, labels in chosen:
        if name in also:
            continue
        if name not in known:
            problems.append(f"metric {name}")
            continue
        available |= known[name]
        problems += [f"label {label} on {name}" for label in labels - known[name] - TARGET_LABELS]
    problems += [f"grouping label {label}" for label in grouping_labels(expr) - available]
    return problems


def test_the_checker_finds_what_is_not_exposed() -> None:
    known = exposed_series()
    good = ('histogram_quantile(0.95, sum by (guard, le) '
            '(rate(guardrail_guard_latency_seconds_bucket{guard=~"llama.*"}[5m])))')
    assert unknown_names(good, known) == []
    assert unknown_names('sum by (kind) (rate(guardrail_errors_total{kind="upstream"}[5m]))'
                         ' / sum(rate(guardrail_requests_total[5m]))', known) == []
    assert unknown_names("rate(guardrail_request_total[5m])", known) == [
        "metric guardrail_request_total"]
    assert unknown_names('rate(guardrail_errors_total{kinds="x"}[5m])', known) == [
        "label kinds on guardrail_errors_total"]
    assert unknown_names("sum by (guards) (rate(guardrail_checks_total[5m]))", known) == [
        "grouping label guards"]
    assert unknown_names("up == 0", known) == ["metric up"]
    assert unknown_names("up == 0", known, also=frozenset({"up"})) == []


def test_alert_rules_query_only_exposed_metrics() -> None:
    known = exposed_series()
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
             for rule in group["rules"]]
    assert rules
    for rule in rules:
        # `up` is Prometheus' own: whether the proxy could be scraped at all.
        assert unknown_names(rule["expr"], known, also=frozenset({"up"})) == [], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=[path.name for path in DASHBOARDS])
def test_dashboard_matches_its_schema_and_queries_only_exposed_metrics(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    schema = json.loads(DASHBOARD_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(dashboard)
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert [source["uid"] for source in provisioned["datasources"]] == ["prometheus"]
    known = exposed_series()
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queried: set[str] = set()
    for panel in panels:
        for target in panel["targets"]:
            assert unknown_names(target["expr"], known) == [], (panel["title"], target["expr"])
            queried |= {name for name, _ in selectors(target["expr"])}
    # Every metric the proxy defines is on the dashboard (histograms through their buckets or
    # sums, counters through their totals).
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in known}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in queried}
    assert families - shown == set()


def test_the_schema_rejects_what_we_rely_on_being_there() -> None:
    schema = json.loads(DASHBOARD_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    dashboard = json.loads(DASHBOARDS[0].read_text())
    panel = next(panel for panel in dashboard["panels"] if panel["type"] != "row")
    for broken in ({**panel, "targets": []},
                   {**panel, "datasource": {"type": "prometheus", "uid": "other"}},
                   {key: value for key, value in panel.items() if key != "targets"}):
        assert not validator.is_valid({**dashboard, "panels": [broken]})
