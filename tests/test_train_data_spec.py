"""``--data`` entries: one parser (offline/train/data_spec.py) for ``train sft`` and ``train
dpo``, so the same entry means the same files at the same ratio in both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from offline.train.data_spec import DataError, DataSpec, expand, parse_spec, parse_specs
from offline.train.dpo import DPORunConfig
from offline.train.mixture import scan
from offline.train.sft_config import resolve


@pytest.mark.parametrize(("entry", "path", "ratio"), [
    ("a.jsonl", "a.jsonl", 1.0),
    ("a.jsonl:0.5", "a.jsonl", 0.5),
    ("runs/b.jsonl:2", "runs/b.jsonl", 2.0),
    ("data:0", "data", 0.0),  # a file left out of the mix, still read and counted
    ("odd:name.jsonl", "odd:name.jsonl", 1.0),  # a colon whose tail is no number: the path's
    ("x.jsonl:1e-1", "x.jsonl", 0.1),
    ({"path": "c.jsonl", "ratio": 3}, "c.jsonl", 3.0),
    ({"path": "c.jsonl"}, "c.jsonl", 1.0),
])
def test_an_entry_parses_to_a_path_and_ratio(entry: Any, path: str, ratio: float) -> None:
    assert parse_spec(entry) == DataSpec(Path(path), ratio)


@pytest.mark.parametrize(("entry", "message"), [
    ("a.jsonl:-1", "the ratio must be a finite number >= 0, not -1.0"),
    ("a.jsonl:nan", "the ratio must be a finite number >= 0, not nan"),
    ("a.jsonl:inf", "the ratio must be a finite number >= 0, not inf"),
    ({"path": "a.jsonl", "ratio": True}, "not True"),
    ({"path": "a.jsonl", "ratio": "half"}, "not 'half'"),
    ({"path": "a.jsonl", "weight": 2}, "unknown key 'weight'"),
    ({"ratio": 2}, "needs a 'path'"),
    ("", "is not FILE_OR_DIR[:RATIO]"),
    (7, "is not FILE_OR_DIR[:RATIO]"),
])
def test_a_bad_entry_is_one_line(entry: Any, message: str) -> None:
    with pytest.raises(DataError, match=r"^--data") as caught:
        parse_spec(entry)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_one_entry_or_a_list_and_none_is_an_error() -> None:
    assert parse_specs("a.jsonl:2") == [DataSpec(Path("a.jsonl"), 2.0)]
    nothing: tuple[Any, ...] = (None, "", [])
    for empty in nothing:
        with pytest.raises(DataError, match="--data is required"):
            parse_specs(empty)


def test_a_folder_stands_for_its_jsonl_files(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "notes.txt"):
        (tmp_path / name).write_text("{}\n", "utf-8")
    assert expand(DataSpec(tmp_path, 0.5)) == [DataSpec(tmp_path / "a.jsonl", 0.5),
                                               DataSpec(tmp_path / "b.jsonl", 0.5)]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"the folder holds no \*\.jsonl file"):
        expand(DataSpec(empty))
    with pytest.raises(DataError, match="no such file or folder"):
        expand(DataSpec(tmp_path / "nope.jsonl"))


def test_a_harvest_folder_gives_each_command_its_own_files_and_no_test_split(
        tmp_path: Path) -> None:
    """`--data DIR` on what `guardrail harvest` writes: sft stopped at the pairs file, dpo at
    the records, and the held-out *.test.jsonl would have been trained on."""
    from offline.train.dpo import _pair_file

    record = '{"prompt": "p", "response": "<think>\\nr\\n</think>\\n\\na"}\n'
    pair = '{"prompt": "p", "chosen": "c", "rejected": "r", "prefix": ""}\n'
    for name, row in (("unsafechain.jsonl", record), ("unsafechain.test.jsonl", record),
                      ("preference_pairs.jsonl", pair), ("preference_pairs.test.jsonl", pair)):
        (tmp_path / name).write_text(row, "utf-8")
    assert [source for source, _ in scan([f"{tmp_path}:0.5"])] == [
        DataSpec(tmp_path / "unsafechain.jsonl", 0.5)]
    assert expand(DataSpec(tmp_path), _pair_file) == [
        DataSpec(tmp_path / "preference_pairs.jsonl")]
    # Named explicitly, a file is taken as it is: the wrong form is still one clear line.
    with pytest.raises(DataError, match=r"preference_pairs\.jsonl:1: neither UnsafeChain"):
        scan([str(tmp_path / "preference_pairs.jsonl")])
    only_pairs = tmp_path / "pairs"
    only_pairs.mkdir()
    (only_pairs / "preference_pairs.jsonl").write_text(pair, "utf-8")
    with pytest.raises(DataError, match="no file in the folder has the form this command "
                                        r"trains on \(found preference_pairs.jsonl\)"):
        scan([str(only_pairs)])


def test_sft_and_dpo_read_an_entry_the_same_way(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "p", "completion": "c", "chosen": "x", "rejected": "y"}\n',
                    "utf-8")
    entries: list[Any] = [f"{data}:0.5", {"path": str(data), "ratio": 2}]
    common = {"model": "m", "out": str(tmp_path / "o")}
    sft = resolve({"data": entries, **common}, {})
    assert [source for source, _ in scan(sft.data)] == [DataSpec(data, 0.5), DataSpec(data, 2.0)]
    dpo = DPORunConfig.from_mapping({"data": entries, **common})
    assert dpo.data == [DataSpec(data, 0.5), DataSpec(data, 2.0)]
    # A bad ratio: the same line from both, before any file is read.
    messages = []
    for build in (lambda: resolve({"data": [f"{data}:-2"], **common}, {}),
                  lambda: DPORunConfig.from_mapping({"data": [f"{data}:-2"], **common})):
        with pytest.raises(DataError) as caught:
            build()
        messages.append(str(caught.value))
    assert messages[0] == messages[1] == (f"--data {data}:-2: the ratio must be a finite "
                                          "number >= 0, not -2.0")
