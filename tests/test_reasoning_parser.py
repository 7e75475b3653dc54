"""The inline ``<think>`` parser: every form upstreams produce, split at every chunk boundary."""

from __future__ import annotations

import itertools
import random

import pytest

from guardrail.events import HeldResolved, HeldText, TextDelta
from guardrail.reasoning import (
    InlineThinkParser,
    ParsedText,
    ThinkStart,
    resolve_held,
    split_inline_think,
)

MODES: tuple[ThinkStart, ...] = ("auto", "reasoning", "answer")

# (name, text, {mode: (reasoning, answer)}); one expectation for all modes when the same.
R = "Okay, 12 < 15 and 3 > 2; the user wants </thin- no, a sum. Ünïcödé ✓\n"
A = "\n\nThe answer is 4 <b>bold</b>."
FORMS: list[tuple[str, str, dict[str, tuple[str, str]]]] = [
    ("tagged", f"<think>{R}</think>{A}", {m: (R, A) for m in MODES}),
    ("tagged after whitespace", f" \n\t<think>{R}</think>{A}", {m: (R, A) for m in MODES}),
    ("closing tag only", f"{R}</think>{A}", {
        "auto": (R, A), "reasoning": (R, A), "answer": ("", f"{R}</think>{A}")}),
    ("no tags", A.strip(), {
        "auto": ("", A.strip()), "reasoning": (A.strip(), ""), "answer": ("", A.strip())}),
    ("no tags, leading whitespace", A, {
        "auto": ("", A), "reasoning": (A, ""), "answer": ("", A)}),
    ("unterminated think", f"<think>{R}", {m: (R, "") for m in MODES}),
    ("empty think", f"<think></think>{A}", {m: ("", A) for m in MODES}),
    ("bare closing tag first", f"</think>{A}", {m: ("", A) for m in MODES}),
    ("tags later in the answer", f"<think>{R}</think>{A} <think>x</think>",
     {m: (R, f"{A} <think>x</think>") for m in MODES}),
    ("not a tag", "<thinking>is fun</thinking>", {
        "auto": ("", "<thinking>is fun</thinking>"),
        "reasoning": ("<thinking>is fun</thinking>", ""),
        "answer": ("", "<thinking>is fun</thinking>")}),
    ("tag prefix at the very end", "<thi", {
        "auto": ("", "<thi"), "reasoning": ("<thi", ""), "answer": ("", "<thi")}),
    ("closing-tag prefix at the end of reasoning", "<think>abc</thin", {
        m: ("abc</thin", "") for m in MODES}),
    ("empty", "", {m: ("", "") for m in MODES}),
]
CASES = [
    pytest.param(text, mode, expected[mode], id=f"{name}-{mode}")
    for name, text, expected in FORMS
    for mode in MODES
]


def run(parser: InlineThinkParser, chunks: list[str]) -> list[TextDelta]:
    out: list[ParsedText] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    out.extend(parser.finish())
    assert all(part.text for part in out if not isinstance(part, HeldResolved)), \
        "no empty deltas"
    resolutions = [part for part in out if isinstance(part, HeldResolved)]
    assert len(resolutions) <= 1, "held text is resolved once"
    if any(isinstance(part, HeldText) for part in out):
        assert resolutions, "held text is always resolved by the end"
    return resolve_held(out)


def joined(deltas: list[TextDelta]) -> tuple[str, str]:
    return (
        "".join(d.text for d in deltas if d.channel == "reasoning"),
        "".join(d.text for d in deltas if d.channel == "answer"),
    )


@pytest.mark.parametrize(("text", "mode", "expected"), CASES)
def test_whole_text(text: str, mode: ThinkStart, expected: tuple[str, str]) -> None:
    assert joined(run(InlineThinkParser(mode), [text])) == expected
    assert split_inline_think(text, mode) == expected


@pytest.mark.parametrize(("text", "mode", "expected"), CASES)
def test_every_split_point(text: str, mode: ThinkStart, expected: tuple[str, str]) -> None:
    for cut in range(len(text) + 1):
        chunks = [text[:cut], text[cut:]]
        assert joined(run(InlineThinkParser(mode), chunks)) == expected, f"cut at {cut}"


@pytest.mark.parametrize(("text", "mode", "expected"), CASES)
def test_character_by_character(text: str, mode: ThinkStart, expected: tuple[str, str]) -> None:
    assert joined(run(InlineThinkParser(mode), list(text))) == expected


@pytest.mark.parametrize("mode", MODES)
def test_every_pair_of_split_points_around_the_tags(mode: ThinkStart) -> None:
    text = " <think>ab</think>cd"
    expected = ("ab", "cd")
    for first, second in itertools.combinations(range(len(text) + 1), 2):
        chunks = [text[:first], text[first:second], text[second:]]
        assert joined(run(InlineThinkParser(mode), chunks)) == expected, (first, second)


@pytest.mark.parametrize(("text", "mode", "expected"), CASES)
def test_random_chunkings(text: str, mode: ThinkStart, expected: tuple[str, str]) -> None:
    rng = random.Random(1234)
    for _ in range(20):
        chunks, rest = [], text
        while rest:
            size = rng.randint(1, 9)
            chunks.append(rest[:size])
            rest = rest[size:]
        assert joined(run(InlineThinkParser(mode), chunks)) == expected


def test_auto_streams_untagged_text_as_held_until_the_closing_tag() -> None:
    parser = InlineThinkParser("auto")
    assert parser.feed("Okay, so the user") == [HeldText("Okay, so the user")]
    # Only a possible closing tag is kept back.
    assert parser.feed(" wants a sum.</th") == [HeldText(" wants a sum.")]
    assert parser.state == "held"
    out = parser.feed("ink>\n\nIt is 4.")
    assert out == [HeldResolved("reasoning"), TextDelta("answer", "\n\nIt is 4.")]
    assert parser.feed(" More.") == [TextDelta("answer", " More.")]
    assert parser.finish() == []


def test_auto_resolves_held_text_as_answer_at_the_end() -> None:
    parser = InlineThinkParser("auto")
    assert parser.feed("Paris is the capital.") == [HeldText("Paris is the capital.")]
    assert parser.finish() == [HeldResolved("answer")]
    assert parser.finish() == []


def test_holding_costs_the_same_per_chunk_however_much_is_held() -> None:
    """Held text streams on: the parser keeps at most a partial tag, never the text so far."""
    parser = InlineThinkParser("auto")
    parser.feed("x")
    for _ in range(20_000):
        parser.feed("word word. ")
        assert len(parser._buffer) < len("</think>")


def test_tagged_reasoning_streams_holding_back_only_a_possible_tag() -> None:
    parser = InlineThinkParser("auto")
    assert parser.feed("<thi") == []
    assert parser.feed("nk>Let me") == [TextDelta("reasoning", "Let me")]
    assert parser.feed(" think </th") == [TextDelta("reasoning", " think ")]
    assert parser.feed("ere") == [TextDelta("reasoning", "</there")]
    assert parser.feed(" now.</") == [TextDelta("reasoning", " now.")]
    assert parser.feed("think>Done") == [TextDelta("answer", "Done")]


def test_reasoning_mode_streams_untagged_text_at_once() -> None:
    parser = InlineThinkParser("reasoning")
    assert parser.feed("Okay, let me") == [TextDelta("reasoning", "Okay, let me")]
    assert parser.feed(" see.</think>Hi") == [
        TextDelta("reasoning", " see."), TextDelta("answer", "Hi")]


def test_answer_mode_never_holds_plain_text() -> None:
    parser = InlineThinkParser("answer")
    assert parser.feed("Hello") == [TextDelta("answer", "Hello")]
    assert parser.feed(" there</think>") == [TextDelta("answer", " there</think>")]


def test_leading_whitespace_waits_only_to_see_whether_a_tag_follows() -> None:
    parser = InlineThinkParser("answer")
    assert parser.feed("\n\n") == []
    assert parser.feed("Hi") == [TextDelta("answer", "\n\nHi")]


def test_reasoning_field_makes_content_the_answer() -> None:
    parser = InlineThinkParser("auto")
    assert parser.saw_reasoning_field() == []
    assert parser.feed("The answer") == [TextDelta("answer", "The answer")]


def test_reasoning_field_releases_held_content_as_answer() -> None:
    parser = InlineThinkParser("auto")
    assert parser.feed("Held text") == [HeldText("Held text")]
    assert parser.saw_reasoning_field() == [HeldResolved("answer")]
    assert parser.feed(" more") == [TextDelta("answer", " more")]


def test_reasoning_field_overrides_the_reasoning_default_but_not_a_tag() -> None:
    by_default = InlineThinkParser("reasoning")
    assert by_default.saw_reasoning_field() == []
    assert by_default.feed("Answer") == [TextDelta("answer", "Answer")]

    tagged = InlineThinkParser("auto")
    assert tagged.feed("<think>still thinking") == [TextDelta("reasoning", "still thinking")]
    assert tagged.saw_reasoning_field() == []
    assert tagged.feed(" more</think>A") == [
        TextDelta("reasoning", " more"), TextDelta("answer", "A")]


def test_reasoning_field_after_a_leading_think_block_in_content() -> None:
    parser = InlineThinkParser("auto")
    parser.saw_reasoning_field()
    out = run(parser, ["<think>inner", "</think>Answer"])
    assert joined(out) == ("inner", "Answer")
