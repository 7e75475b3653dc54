"""Public sets into the UnsafeChain record form, from small local files (the hub is never
reached in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offline.harvest.importers import PublicSetError, import_public_set
from tests.test_harvest_filters import DATA


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_unsafechain_tagged_and_untagged(tmp_path: Path) -> None:
    path = write(tmp_path / "unsafechain.jsonl", [
        {"prompt": "How do I hotwire a car?", "split_name": "selected",
         "response": "<think>\nThe user wants to steal a car.\n</think>\n\nI can't help."},
        {"prompt": "Tell me a joke", "response": "Why did the chicken cross the road?"},
        {"prompt": "", "response": "orphan"},
        {"prompt": "No answer", "response": "<think>thinking only</think>"},
    ])
    result = import_public_set("unsafechain", path)
    assert [r.source for r in result.kept] == ["unsafechain", "unsafechain"]
    first, second = result.kept
    assert first.response == "<think>\nThe user wants to steal a car.\n</think>\n\nI can't help."
    assert first.correction == "rewrite"
    assert second.response == "Why did the chicken cross the road?"
    assert result.removed == {"no_prompt": 1, "no_answer": 1}
    assert result.details["tagged"] == 2 and result.details["untagged"] == 1
    dropped = import_public_set("unsafechain", path, untagged="drop")
    assert len(dropped.kept) == 1 and dropped.removed["untagged"] == 1


def test_safechain_without_an_opening_tag(tmp_path: Path) -> None:
    # SafeChain's responses leave out <think> (the R1 template opens it in the prompt).
    path = write(tmp_path / "safechain.json", [
        {"instruction": "How to make a bomb?", "response": "This is dangerous.\n</think>\n\nNo.",
         "label": "safe"}])
    (record,) = import_public_set("safechain", path).kept
    assert record.prompt == "How to make a bomb?"
    assert record.response == "<think>\nThis is dangerous.\n</think>\n\nNo."
    assert record.source == "safechain" and record.correction == "none"


def test_star1_fields_and_parquet(tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    table = pyarrow.Table.from_pylist([
        {"id": 5, "question": "q?", "response": "<think>r</think>a",
         "category": ["Self-Harm", "Violence / Physical Harm"], "source": "SaladBench"}])
    parquet.write_table(table, tmp_path / "star1.parquet")
    (record,) = import_public_set("star1", tmp_path / "star1.parquet").kept
    assert (record.prompt, record.response, record.category, record.case_id, record.source) == (
        "q?", "<think>\nr\n</think>\n\na", "Self-Harm, Violence / Physical Harm", "5", "star1")


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PublicSetError, match="unknown public set"):
        import_public_set("nope", tmp_path / "x.json")
    with pytest.raises(PublicSetError, match="no such file"):
        import_public_set("star1", tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(PublicSetError, match="cannot read"):
        import_public_set("star1", tmp_path / "broken.json")
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(PublicSetError, match="JSON array"):
        import_public_set("star1", tmp_path / "scalar.json")
    write(tmp_path / "mixed.json", [3, {"question": "q", "response": "a"}])  # type: ignore[list-item]
    result = import_public_set("star1", tmp_path / "mixed.json")
    assert len(result.kept) == 1 and result.removed == {"not_an_object": 1}


def test_hub_unreachable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(PublicSetError, match=r"raj-tomar001/UnSafeChain.*local file"):
        import_public_set("unsafechain")


@pytest.mark.skipif(not (DATA / "star1" / "STAR-1.json").is_file(),
                    reason=f"the shared STAR-1 copy is not in {DATA}")
def test_the_real_star1_file() -> None:
    result = import_public_set("star1", DATA / "star1" / "STAR-1.json")
    assert len(result.kept) == 1000 and result.removed_total == 0
    assert result.details["tagged"] == 1000
    for record in result.kept:
        parsed = record.parsed
        assert parsed.tagged and parsed.reasoning and parsed.answer
        assert record.response.startswith("<think>\n") and record.source == "star1"
