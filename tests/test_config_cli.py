"""The configuration file and ``guardrail serve``: defaults, every named key, ``${VAR}``, and bad
files reported as one line naming the field. The CLI runs as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from guardrail.config import Config, config_from_mapping, expand_env, load_config
from guardrail.errors import ConfigError, UnknownBackendError
from server.app import create_app
from server.serve_command import _describe_start
from tests.fakes.loopback import free_port, serve_app
from tests.fakes.openai_server import FakeReply, create_fake_openai_app

GUARDRAIL = Path(sys.executable).parent / "guardrail"
UNSET = "GUARDRAIL_TEST_SURELY_UNSET_VAR"

FULL_YAML = """\
upstream:
  url: http://10.0.0.5:8001/v1
  model: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
  api_key: sk-upstream
guard:
  kind: llama-guard
  url: http://10.0.0.6:8002/v1
  model: meta-llama/Llama-Guard-3-1B
  on_error: allow
stream:
  mode: fast
correction:
  strategy: block
store:
  url: postgresql://guard:secret@db.internal:5432/cases
server:
  api_keys: [sk-client-1, sk-client-2]
  admin_keys: [sk-admin-1]
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the config file ---------------------------------------------------------------------------


def test_defaults_run_on_a_laptop() -> None:
    for config in (Config(), load_config(None), config_from_mapping(None),
                   config_from_mapping({})):
        assert config.upstream.resolved_kind() == "demo"
        assert config.upstream.url is None and config.upstream.api_key is None
        assert config.guard.kind == "embedded" and config.guard.on_error == "block"
        assert config.stream.mode == "strict"
        assert config.correction.strategy == "intervene"
        assert config.correction.fallback == "refuse"
        assert config.store.url.startswith("sqlite:///")
        assert config.server.api_keys == [] and config.server.admin_keys == []
        assert (config.server.host, config.server.port) == ("127.0.0.1", 8000)


def test_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing configured\n")) == Config()


def test_every_named_key_parses(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_YAML))
    assert config.upstream.url == "http://10.0.0.5:8001/v1"
    assert config.upstream.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert config.upstream.api_key == "sk-upstream"
    assert config.upstream.resolved_kind() == "openai"  # a url wins over a model string
    assert config.guard.kind == "llama-guard"
    assert config.guard.url == "http://10.0.0.6:8002/v1"
    assert config.guard.model == "meta-llama/Llama-Guard-3-1B"
    assert config.guard.on_error == "allow"
    assert config.stream.mode == "fast"
    assert config.correction.strategy == "block"
    assert config.store.url == "postgresql://guard:secret@db.internal:5432/cases"
    assert config.server.api_keys == ["sk-client-1", "sk-client-2"]
    assert config.server.admin_keys == ["sk-admin-1"]


def test_an_upstream_model_alone_means_litellm() -> None:
    config = config_from_mapping({"upstream": {"model": "deepseek/deepseek-reasoner"}})
    assert config.upstream.resolved_kind() == "litellm"


def test_environment_variables_are_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GR_UPSTREAM_KEY", "sk-from-env")
    monkeypatch.setenv("GR_HOST", "10.1.2.3")
    monkeypatch.setenv("GR_PORT", "8443")
    monkeypatch.setenv("GR_CLIENT", "sk-c")
    monkeypatch.setenv("GR_EMPTY", "")
    monkeypatch.delenv(UNSET, raising=False)
    config = load_config(write(tmp_path, f"""\
upstream:
  url: http://${{GR_HOST}}:${{GR_PORT}}/v1
  api_key: ${{GR_UPSTREAM_KEY}}
guard:
  kind: ${{{UNSET}:-none}}
  url: ${{{UNSET}:-}}
  model: ${{GR_EMPTY:-fallback-model}}
  api_key: ${{GR_EMPTY}}
server:
  port: ${{GR_PORT}}
  api_keys: ["${{GR_CLIENT}}", "literal-$HOME-not-expanded"]
  admin_keys: ["${{{UNSET}:-admin-default}}"]
"""))
    assert config.upstream.url == "http://10.1.2.3:8443/v1"
    assert config.upstream.api_key == "sk-from-env"
    assert config.guard.kind == "none"
    assert config.guard.url == ""
    assert config.guard.model == "fallback-model"  # ``:-`` also covers a set but empty variable
    assert config.guard.api_key == ""  # no default: the empty value stands
    assert config.server.port == 8443  # expanded, then validated as an int
    assert config.server.api_keys == ["sk-c", "literal-$HOME-not-expanded"]
    assert config.server.admin_keys == ["admin-default"]


def test_expansion_leaves_non_strings_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GR_X", "x")
    assert expand_env({"a": 1, "b": [True, None, 2.5], "c": "${GR_X}${GR_X}"}) == {
        "a": 1, "b": [True, None, 2.5], "c": "xx"}


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        (f"upstream:\n  api_key: ${{{UNSET}}}\n", "upstream.api_key"),
        (f"server:\n  api_keys: [ok, 'Bearer ${{{UNSET}}}']\n", "server.api_keys[1]"),
    ],
)
def test_a_missing_variable_is_an_error_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, yaml_text: str, field: str
) -> None:
    monkeypatch.delenv(UNSET, raising=False)
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message == f"{path}: {field}: environment variable {UNSET} is not set"


BAD_FILES = [
    ("guard:\n  on_error: maybe\n", "guard.on_error", "'block' or 'allow'"),
    ("stream:\n  mode: slow\n", "stream.mode", "'strict' or 'fast'"),
    ("guard:\n  knd: none\n", "guard.knd", "Extra inputs are not permitted"),
    ("upstreams:\n  url: http://x/v1\n", "upstreams", "Extra inputs are not permitted"),
    ("server:\n  port: 99999\n", "server.port", "65535"),
    ("server:\n  api_keys: sk-one-key\n", "server.api_keys", "valid list"),
    ("guard: none\n", "guard", "valid dictionary"),
    ("- upstream\n- guard\n", "(top level)", "mapping"),
    ("just a sentence\n", "(top level)", "mapping"),
    ("guard: {kind: none\n", "not valid YAML", "line 2"),
    ("guard:\n  kind: none\n\tmode: strict\n", "not valid YAML", "line 3"),
]
BAD_IDS = ["on_error", "mode", "misspelt-key", "misspelt-section", "port-range",
           "keys-not-list", "section-not-mapping", "list-file", "scalar-file", "bad-yaml-flow",
           "bad-yaml-tab"]


@pytest.mark.parametrize(("yaml_text", "field", "detail"), BAD_FILES, ids=BAD_IDS)
def test_a_bad_file_is_one_line_naming_the_field(
    tmp_path: Path, yaml_text: str, field: str, detail: str
) -> None:
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field}"), message
    assert detail in message


def test_several_mistakes_are_counted_in_the_one_line() -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_mapping({"guard": {"on_error": "maybe"}, "stream": {"mode": "slow"}})
    assert str(raised.value).startswith("guard.on_error: ")
    assert str(raised.value).endswith("(and 1 more)")


def test_an_unreadable_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as raised:
        load_config(missing)
    assert str(raised.value) == f"{missing}: cannot read (No such file or directory)"


# -- backends are named in the config and resolved at start-up --------------------------------


@pytest.mark.parametrize(
    ("section", "value", "known"),
    [
        ("guard", {"kind": "llamaguard"}, ["embedded", "llama-guard", "none"]),
        ("correction", {"strategy": "apologise"}, ["block", "intervene", "refuse", "rewrite"]),
        ("store", {"url": "mysql://localhost/cases"}, ["postgresql", "sqlite"]),
    ],
    ids=["guard", "correction", "store"],
)
async def test_an_unknown_backend_fails_the_app_start_listing_the_known_ones(
    tmp_path: Path, section: str, value: dict[str, str], known: list[str]
) -> None:
    base = {"upstream": {"url": "http://127.0.0.1:9/v1"}, "guard": {"kind": "none"},
            "store": {"url": f"sqlite:///{tmp_path / 'cases.db'}",
                      "fallback_path": str(tmp_path / "unstored.jsonl")}}
    config = config_from_mapping({**base, section: {**base.get(section, {}), **value}})
    app = create_app(config)  # building the app resolves nothing yet
    with pytest.raises(UnknownBackendError) as raised:
        async with app.router.lifespan_context(app):
            pass
    message = str(raised.value)
    assert repr(next(iter(value.values())).split("://")[0]) in message
    for name in known:
        assert name in message
    assert app.state.startup_error is raised.value


# -- the command line, as a real subprocess ----------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != UNSET}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert GUARDRAIL.is_file(), f"console script missing: {GUARDRAIL}"
    return subprocess.run([str(GUARDRAIL), "serve", *args], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=60, check=False)


CLI_BAD_FILES = [
    ("guard:\n  on_error: maybe\n", "guard.on_error"),
    ("stream:\n  mode: slow\n", "stream.mode"),
    ("guard:\n  kind: none\n  knd: none\n", "guard.knd"),
    ("guard: {kind: none\n", "not valid YAML"),
    (f"upstream:\n  url: http://127.0.0.1:9/v1\n  api_key: ${{{UNSET}}}\n", "upstream.api_key"),
    ("guard:\n  kind: llamaguard\n", "guard.kind"),
    ("correction:\n  strategy: apologise\n", "correction.strategy"),
    ("store:\n  url: mysql://localhost/cases\n", "store.url"),
    ("store:\n  url: data/cases.db\n", "store.url"),
]


@pytest.mark.parametrize(("yaml_text", "field"), CLI_BAD_FILES,
                         ids=["on_error", "mode", "misspelt", "bad-yaml", "missing-env",
                              "guard-kind", "correction", "store-scheme", "store-no-scheme"])
def test_serve_with_a_bad_file_exits_2_with_one_line(
    tmp_path: Path, yaml_text: str, field: str
) -> None:
    path = write(tmp_path, yaml_text, "bad.yaml")
    result = run_cli(tmp_path, "--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("guardrail: config error: ")
    assert field in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "data").exists(), "a failed start must not create the store"


def test_serve_with_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"guardrail: config error: {tmp_path / 'absent.yaml'}: cannot read "
        "(No such file or directory)"]


def test_a_backend_that_fails_while_starting_is_one_error_line(tmp_path: Path) -> None:
    # llama-guard without guard.url runs in-process from guard.model: valid YAML with known
    # names, and only loading the model at start-up finds it missing (no hub here). It is still
    # one config error line, not a traceback.
    path = write(tmp_path, f"""\
upstream:
  url: http://127.0.0.1:9/v1
guard:
  kind: llama-guard
store:
  url: sqlite:///{tmp_path / 'cases.db'}
  fallback_path: {tmp_path / 'unstored.jsonl'}
""")
    result = run_cli(tmp_path, "--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("guardrail: config error: guard.model:")


@pytest.fixture
def fake_model() -> Iterator[str]:
    reply = FakeReply(reasoning="Two and two. That makes four.", answer="2 + 2 = 4.")
    with serve_app(create_fake_openai_app(reply)) as url:
        yield url


def test_serve_runs_answers_and_stops_on_sigint(tmp_path: Path, fake_model: str) -> None:
    port = free_port()
    path = write(tmp_path, f"""\
upstream:
  url: {fake_model}/v1
guard:
  kind: none
store:
  url: sqlite:///{tmp_path / 'cases.db'}
  fallback_path: {tmp_path / 'unstored.jsonl'}
server:
  api_keys: ["${{GR_TEST_CLIENT_KEY}}"]
""")
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [str(GUARDRAIL), "serve", "--config", str(path), "--port", str(port)],
            cwd=tmp_path, env=cli_env(GR_TEST_CLIENT_KEY="sk-cli-test"),
            stdout=subprocess.DEVNULL, stderr=stderr,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=10) as client:
                deadline = time.monotonic() + 30
                while True:
                    assert process.poll() is None, stderr_path.read_text()
                    try:
                        health = client.get("/healthz")
                        break
                    except httpx.TransportError:
                        assert time.monotonic() < deadline, "the proxy never answered"
                        time.sleep(0.1)
                assert health.status_code == 200
                assert health.json()["status"] == "ok"
                assert (health.json()["upstream"], health.json()["guard"]) == ("openai", "none")
                body = {"model": "fake-model", "messages": [{"role": "user", "content": "2+2?"}]}
                refused = client.post("/v1/chat/completions", json=body)
                assert refused.status_code == 401  # the key came from ${GR_TEST_CLIENT_KEY}
                answer = client.post("/v1/chat/completions", json=body,
                                     headers={"authorization": "Bearer sk-cli-test"})
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["message"]["content"] == "2 + 2 = 4."
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    log = stderr_path.read_text()
    assert log.splitlines()[0] == (
        f"guardrail: upstream openai-compatible at {fake_model}/v1; guard none; mode strict; "
        f"correction intervene; cases in sqlite:///{tmp_path / 'cases.db'}")
    assert f"listening on http://127.0.0.1:{port}/v1" in log
    assert "Traceback" not in log
    assert "sk-cli-test" not in log
    assert (tmp_path / "cases.db").is_file()


# -- the start-up line -------------------------------------------------------------------------


def test_the_start_line_says_when_the_demo_upstream_is_used() -> None:
    line = _describe_start(Config())
    assert line.startswith("guardrail: upstream demo (no upstream configured")
    assert "guard embedded" in line and "mode strict" in line and "correction intervene" in line


def test_the_start_line_names_the_upstream_and_hides_secrets() -> None:
    config = config_from_mapping({
        "upstream": {"model": "deepseek/deepseek-reasoner", "api_key": "sk-upstream-secret"},
        "store": {"url": "postgresql://guard:db-secret@db.internal:5432/cases"},
    })
    line = _describe_start(config)
    assert "litellm model deepseek/deepseek-reasoner" in line
    assert "demo" not in line
    assert "db.internal:5432/cases" in line
    assert "secret" not in line
    openai = _describe_start(config_from_mapping({"upstream": {"url": "http://gpu:8000/v1"}}))
    assert "openai-compatible at http://gpu:8000/v1" in openai
