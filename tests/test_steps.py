"""Step splitting: lossless, bounded, and the same whatever the chunking."""

from __future__ import annotations

import random
from typing import Literal, TypedDict, Unpack

import pytest

from guardrail.steps import StepSplitter

TEXT = (
    "Okay, the user wants to know how to bake bread. First, I should list the ingredients: "
    "flour, water, salt and yeast! Is 3.5 cups of flour right? Probably.\n\n"
    "Next I will describe kneading.\nThen proofing for 1.5 hours. Done"
)


class SplitterOptions(TypedDict, total=False):
    """StepSplitter's keyword arguments."""

    split: Literal["sentence", "paragraph"]
    max_chars: int
    min_chars: int


def split_whole(text: str, **kwargs: Unpack[SplitterOptions]) -> list[str]:
    splitter = StepSplitter(**kwargs)
    return splitter.feed(text) + splitter.finish()


def split_in_chunks(
    text: str, sizes: list[int], **kwargs: Unpack[SplitterOptions]
) -> list[str]:
    splitter = StepSplitter(**kwargs)
    steps: list[str] = []
    position = 0
    for size in sizes:
        steps += splitter.feed(text[position : position + size])
        position += size
    steps += splitter.feed(text[position:])
    return steps + splitter.finish()


def test_sentences_keep_every_character() -> None:
    steps = split_whole(TEXT, min_chars=0)
    assert "".join(steps) == TEXT
    assert steps[0] == "Okay, the user wants to know how to bake bread. "
    assert "Is 3.5 cups of flour right? " in steps  # a decimal point is no boundary
    assert steps[-1] == "Done"


def test_newline_ends_a_step_and_paragraph_mode_waits_for_a_blank_line() -> None:
    sentence_steps = split_whole(TEXT, min_chars=0)
    assert "Next I will describe kneading.\n" in sentence_steps
    paragraphs = split_whole(TEXT, split="paragraph", min_chars=0)
    assert "".join(paragraphs) == TEXT
    assert len(paragraphs) == 2
    assert paragraphs[0].endswith("Probably.\n\n")


def test_short_sentences_join_the_next_one() -> None:
    steps = split_whole("Ok. Sure. Now a longer sentence follows here. End.", min_chars=12)
    assert steps[0] == "Ok. Sure. Now a longer sentence follows here. "
    assert all(len(step) >= 4 for step in steps)


def test_max_length_cuts_at_a_space_and_never_exceeds_it() -> None:
    text = "word " * 100  # no sentence ends at all
    steps = split_whole(text, max_chars=64, min_chars=8)
    assert "".join(steps) == text
    assert all(len(step) <= 64 for step in steps)
    assert all(step.endswith(" ") for step in steps)
    unbroken = "x" * 150
    assert split_whole(unbroken, max_chars=64, min_chars=8) == ["x" * 64, "x" * 64, "x" * 22]


@pytest.mark.parametrize("seed", range(20))
def test_chunking_never_changes_the_steps(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.randint(1, 9) for _ in range(len(TEXT))]
    options: list[SplitterOptions] = [{"min_chars": 0}, {"min_chars": 24, "max_chars": 40},
                                      {"split": "paragraph", "min_chars": 5}]
    for kwargs in options:
        assert split_in_chunks(TEXT, sizes, **kwargs) == split_whole(TEXT, **kwargs)


def test_boundary_waits_for_the_next_character() -> None:
    splitter = StepSplitter(min_chars=0)
    assert splitter.feed("It works.") == []  # "." might be a decimal point
    assert splitter.feed(" And") == ["It works. "]
    assert splitter.pending == "And"
    assert splitter.finish() == ["And"]


def test_rejects_impossible_bounds() -> None:
    with pytest.raises(ValueError):
        StepSplitter(max_chars=10, min_chars=10)
