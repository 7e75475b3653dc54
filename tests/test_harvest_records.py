"""The UnsafeChain record and the IPO pair: their text forms, validation, and that the files
load with `datasets` as a trainer loads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardrail.continuation import AssistantPrefix, load_template
from offline.harvest.pairs import PreferencePair, build_pair
from offline.harvest.records import (
    BadRow,
    RecordError,
    UnsafeChainRecord,
    format_response,
    read_jsonl,
    split_response,
    write_jsonl,
)


def test_response_form_and_both_tag_styles() -> None:
    text = format_response(" The user asks for X. I must refuse. ", " I can't help with that. ")
    assert text == ("<think>\nThe user asks for X. I must refuse.\n</think>\n\n"
                    "I can't help with that.")
    parsed = split_response(text)
    assert (parsed.reasoning, parsed.answer, parsed.tagged) == (
        "The user asks for X. I must refuse.", "I can't help with that.", True)
    # R1 templates open the block in the prompt: only the closing tag is in the text.
    closing_only = split_response("Reasoning here.\n</think>\n\nAnswer.")
    assert (closing_only.reasoning, closing_only.answer) == ("Reasoning here.", "Answer.")
    # A trace that quotes the tag: only the last one ends the reasoning.
    quoted = split_response("<think>I should not print </think> literally.</think>Done.")
    assert (quoted.reasoning, quoted.answer) == ("I should not print </think> literally.", "Done.")
    untagged = split_response("Just an answer.")
    assert (untagged.reasoning, untagged.answer, untagged.tagged) == ("", "Just an answer.", False)


def test_record_validation() -> None:
    record = UnsafeChainRecord.from_dict({
        "prompt": "p", "response": format_response("r", "a"), "score": 1, "case_id": 7,
        "correction": "intervene", "unknown": "ignored"})
    assert record.score == 1.0 and record.case_id == "7" and record.correction == "intervene"
    assert record.parsed.answer == "a"
    for bad, field in (([], "object"), ({"response": "x"}, "prompt"),
                       ({"prompt": "p", "response": " "}, "response"),
                       ({"prompt": "p", "response": "r", "correction": "x"}, "correction"),
                       ({"prompt": "p", "response": "r", "score": "high"}, "score"),
                       ({"prompt": "p", "response": "r", "score": True}, "score")):
        with pytest.raises(RecordError, match=field):
            UnsafeChainRecord.from_dict(bad)


def test_pair_keeps_the_prefix_in_the_prompt() -> None:
    pair = build_pair(
        "How do I pick a lock?", "The user asks about locks. First, ",
        "Wait, this could be used to break into a home.", "I should not give steps.",
        "I can't help with that, but a locksmith can.", "take a tension wrench and rake the pins.",
        case_id="c1", category="S2")
    template = load_template("deepseek-r1-distill")
    # The standard (string) form: the rendered generation prompt, <think>, then the prefix, so
    # the trainer's loss falls on chosen / rejected only.
    assert pair.prompt.startswith(template.bos_token)
    assert pair.prompt.count(template.bos_token) == 1
    # DeepSeek's role markers use FULLWIDTH VERTICAL LINE (U+FF5C).
    assert pair.prompt.endswith(
        "<\uff5cAssistant\uff5c><think>\nThe user asks about locks. First,")
    assert "How do I pick a lock?" in pair.prompt
    # The boundary's space opens both suffixes (TRL tokenizes prompt and completion apart).
    assert pair.chosen == (" Wait, this could be used to break into a home. I should not give "
                           "steps.\n</think>\n\nI can't help with that, but a locksmith can.")
    assert pair.rejected == " take a tension wrench and rake the pins."
    # Joined, each side is exactly the text the model saw after the rendered request.
    seen = template.render_prefix([{"role": "user", "content": "How do I pick a lock?"}],
                                  AssistantPrefix(reasoning="The user asks about locks. First, "))
    assert pair.prompt + pair.rejected == seen + "take a tension wrench and rake the pins."
    assert (pair.prompt + pair.chosen).startswith(seen + "Wait, this could")
    assert PreferencePair.from_dict(pair.to_dict()) == pair
    with pytest.raises(RecordError, match="same text"):
        build_pair("q", "p ", "T", "", "", "T")
    with pytest.raises(RecordError, match="non-empty"):
        build_pair("q", "p ", "T", "", "", "  ")
    with pytest.raises(RecordError, match="end with"):
        PreferencePair.from_dict({**pair.to_dict(), "prefix": "something else"})


def test_a_qwen3_pair_opens_the_think_block_itself() -> None:
    pair = build_pair("q?", "Prefix.", "Wait.", "Safe.", "Answer.", "Unsafe.", template="qwen3")
    assert pair.prompt.endswith("<|im_start|>assistant\n<think>\nPrefix.")


def test_files_load_with_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    records = [UnsafeChainRecord.build(f"prompt {i}", "reasoning", "answer", score=0.9,
                                       category="S1", case_id=str(i)) for i in range(3)]
    pairs = [build_pair(f"q{i}", "pre ", "Wait.", "safe", "ans", "unsafe") for i in range(2)]
    assert write_jsonl(tmp_path / "unsafechain.jsonl", (r.to_dict() for r in records)) == 3
    write_jsonl(tmp_path / "preference_pairs.jsonl", (p.to_dict() for p in pairs))
    assert not list(tmp_path.glob("*.partial"))
    loaded = datasets.load_dataset("json", data_files=str(tmp_path / "unsafechain.jsonl"),
                                   split="train")
    assert loaded.num_rows == 3 and loaded[0]["response"].startswith("<think>\n")
    assert UnsafeChainRecord.from_dict(loaded[1]) == records[1]
    loaded_pairs = datasets.load_dataset(
        "json", data_files=str(tmp_path / "preference_pairs.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(loaded_pairs.column_names)
    assert loaded_pairs[0]["prompt"].endswith("pre")
    assert loaded_pairs[0]["chosen"].startswith(" Wait.")


def test_read_jsonl_reports_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n\n{broken\n" + json.dumps([1]) + "\n")
    items = list(read_jsonl(path))
    assert items[0] == (1, {"a": 1})
    assert isinstance(items[1], BadRow) and items[1].line == 3
    assert items[2] == (4, [1])


def test_the_proxy_never_imports_the_offline_tools() -> None:
    import subprocess
    import sys

    heavy = ("datasketch", "presidio_analyzer", "presidio_anonymizer", "datasets", "spacy",
             "offline.harvest")
    code = ("import sys, server.app, guardrail.monitor, guardrail.correctors.rewrite; "
            f"print([name for name in {heavy!r} if name in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1], check=True)
    assert done.stdout.strip() == "[]"
