"""``store.redact``: the named case fields are blanked, everything else is kept, the original
case is untouched, and an unknown name is a config error naming ``store.redact``."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from guardrail.cases.model import Case, Correction, Flag, StepRecord
from guardrail.cases.redact import REDACTABLE, redact
from guardrail.config import config_from_mapping
from guardrail.errors import ConfigError
from tests.fakes.openai_server import FakeReply
from tests.proxy_harness import running_proxy

SECRET = "my card number is 4111"


def sample_case() -> Case:
    return Case(
        model="fake-model",
        request={"model": "fake-model", "temperature": 0.2,
                 "messages": [{"role": "system", "content": "be kind " + SECRET},
                              {"role": "user", "content": [{"type": "text", "text": SECRET}]},
                              {"role": "assistant", "content": None, "tool_calls": [
                                  {"id": "call_1", "type": "function", "function": {
                                      "name": "lookup", "arguments": SECRET}}]},
                              {"role": "tool", "tool_call_id": "call_1", "content": SECRET}]},
        steps=[StepRecord(index=0, channel="reasoning", text="step one " + SECRET, unsafe=False,
                          raw="safe " + SECRET, score=0.1),
               StepRecord(index=1, channel="reasoning", text="step two " + SECRET, unsafe=True,
                          categories=["S9"], raw="unsafe\nS9", score=0.9)],
        withheld="withheld " + SECRET,
        client_reasoning="seen reasoning " + SECRET,
        client_content="seen answer " + SECRET,
        tool_calls=[{"id": "call_2", "type": "function",
                     "function": {"name": "pay", "arguments": SECRET}}],
        action="intervened",
        flagged=[Flag(step=1, categories=["S9"], score=0.9)],
        corrections=[Correction(round=1, strategy="intervene", withheld="cut " + SECRET,
                                inserted="trigger " + SECRET, continuation="then " + SECRET)],
    )


def test_nothing_is_redacted_by_default() -> None:
    case = sample_case()
    assert redact(case, []) == case
    assert config_from_mapping({}).store.redact == []


def test_every_text_field_can_be_blanked_and_the_verdicts_stay() -> None:
    case = sample_case()
    assert SECRET in case.model_dump_json()
    redacted = redact(case, list(REDACTABLE))
    assert SECRET not in redacted.model_dump_json()
    assert redacted.request == {}
    assert [step.text for step in redacted.steps] == ["", ""]
    assert [step.raw for step in redacted.steps] == [None, None]
    # What the metrics and the harvest's bookkeeping need survives.
    assert [(s.index, s.unsafe, s.categories, s.score) for s in redacted.steps] == [
        (0, False, [], 0.1), (1, True, ["S9"], 0.9)]
    assert redacted.id == case.id and redacted.action == "intervened"
    assert redacted.flagged == case.flagged
    assert redacted.corrections[0].round == 1 and redacted.corrections[0].strategy == "intervene"
    # The original is untouched: the recorder may still need it.
    assert SECRET in case.model_dump_json()


@pytest.mark.parametrize("name", list(REDACTABLE))
def test_each_name_blanks_only_its_field(name: str) -> None:
    case = sample_case()
    redacted = redact(case, [name])
    before, after = case.model_dump(), redacted.model_dump()
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {name.split(".")[0]}
    assert SECRET in redacted.model_dump_json()  # the other fields still hold it


def test_request_messages_keeps_roles_and_parameters() -> None:
    redacted = redact(sample_case(), ["request.messages"])
    assert redacted.request["temperature"] == 0.2
    assert redacted.request["messages"] == [
        {"role": "system", "content": ""}, {"role": "user", "content": ""},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup",
                                                              "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": ""}]


def test_request_then_messages_compose() -> None:
    assert redact(sample_case(), ["request", "request.messages"]).request == {}


def test_config_accepts_known_names() -> None:
    config = config_from_mapping({"store": {"redact": ["request.messages", "steps.text"]}})
    assert config.store.redact == ["request.messages", "steps.text"]


def test_an_unknown_name_is_a_config_error_naming_store_redact() -> None:
    with pytest.raises(ConfigError, match=r"store\.redact.*'steps\.txt'") as caught:
        config_from_mapping({"store": {"redact": ["withheld", "steps.txt"]}})
    assert "steps.text" in str(caught.value)  # the known names are listed


def test_the_proxy_stores_redacted_cases(tmp_path: Path) -> None:
    """Wired end to end: what the store holds (in progress and final) has the fields blanked,
    while the client still gets its answer and the verdicts stay in the record."""
    reply = FakeReply(reasoning="The user shares a number. " + SECRET + ". Fine. ",
                      answer="Noted.")
    overrides = {"store": {"redact": ["request", "steps.text", "client_reasoning",
                                      "client_content"]}}
    with running_proxy(tmp_path, reply, overrides=overrides) as proxy:
        for stream in (False, True):
            response = proxy.chat(SECRET, stream=stream)
            assert response.status_code == 200
            assert SECRET.encode() in response.content  # the client's answer is not redacted
            case = proxy.case(response.headers["x-guardrail-case-id"])
            assert SECRET not in json.dumps(case)
            assert case["steps"] and all(step["unsafe"] is False for step in case["steps"])
        stored = sqlite3.connect(proxy.store_path).execute("SELECT record FROM cases").fetchall()
        assert stored and all(SECRET not in row[0] for row in stored)
