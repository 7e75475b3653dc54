"""benchmarks/train_throughput.py's bookkeeping: its rows land at the end of its own table in
RESULTS.md, later sections untouched; a failed mode is a row that says so, not a figure. (The
measurement itself runs for tens of seconds even on the tiny config: not a `make test` cost.)"""

from __future__ import annotations

from pathlib import Path

from benchmarks.train_throughput import HEADER, SECTION, _row, append_rows, parse_args

RESULT = {"mode": "lora", "device": "NVIDIA H100", "config": "1.5b", "parameters": 1.54e9,
          "trainable": 18.5e6, "precision": "bf16", "seq_len": 2048, "batch": 4, "steps": 10,
          "gradient_checkpointing": True, "tokens_per_s": 12345.6, "peak_memory_gib": 20.5,
          "peak_memory_kind": "max_memory_allocated"}


def test_rows_go_to_the_end_of_their_table(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\n{SECTION}\n\nprose\n\n{HEADER}\n| old |\n\n## later\n",
                       "utf-8")
    row = _row(RESULT, "2026-12-01")
    assert row == ("| 2026-12-01 | lora | NVIDIA H100 | 1.5b (1,540.0 M parameters, 18.50 M "
                   "trained) | bf16 | 2048 x 4 | on | 10 | 12,346 | 20.50 "
                   "(max_memory_allocated) |")
    append_rows(results, [row])
    lines = results.read_text("utf-8").splitlines()
    assert lines[lines.index("| old |") + 1] == row and lines[-1] == "## later"
    fresh = tmp_path / "new.md"
    append_rows(fresh, [_row({"mode": "full", "failed": "CUDA out of memory"}, "d")])
    assert fresh.read_text("utf-8").splitlines()[-1].startswith(
        "| d | full | failed: CUDA out of memory |")
    assert SECTION in fresh.read_text("utf-8")


def test_defaults_are_the_real_shape() -> None:
    args = parse_args([])
    assert (args.config_size, args.device, args.precision) == ("1.5b", "auto", "auto")
