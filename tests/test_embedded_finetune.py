"""Fine-tuning the embedded guard's encoder (``--finetune-layers``), tiny and on CPU, with the
real packaged all-MiniLM-L6-v2: the top layer is trained on a few dozen windows, only it
changes, the folder it is saved to is served by the real guard (``guard.model``) with the
scores the in-memory model gives, an interrupted run resumes to the same weights, and the heads
on the frozen encoder (the shipped ones) load as before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError
from guardrail.guards.base import GuardView
from guardrail.guards.embedded.encoder import load_encoder
from guardrail.guards.embedded.guard import SHIPPED_HEAD, EmbeddedGuard
from guardrail.guards.embedded.head import LinearHead, load_head
from guardrail.guards.embedded.layers import LAYERS_FILE, read_layers, write_layers
from offline.embedded_data import Labelled, write_records
from offline.embedded_features import WindowSet, response_windows
from offline.embedded_finetune import (
    FineTuneSettings,
    TunedEncoder,
    _cells,
    balanced_batch,
    fine_tune,
)
from offline.embedded_loso import main as loso_main
from offline.train_embedded_guard import main as train_main
from offline.train_embedded_guard import parse_args
from tests.test_embedded_training import HARMFUL, HARMLESS

SETTINGS = FineTuneSettings(layers=1, epochs=1.0, batch_size=8, head_learning_rate=1e-2,
                            encoder_learning_rate=1e-3, warmup_fraction=0.0, seed=3)


def records() -> list[Labelled]:
    """Three small sources of each class's rows (a few dozen windows in all)."""
    rows = []
    for copy, source in enumerate(("team-a", "team-b", "team-c")):
        for number, (prompt, response) in enumerate(HARMFUL):
            rows.append(Labelled(source, "response", prompt, f"{response} ({copy})", 1,
                                 "harmful", f"{source}:h{number}"))
        for number, (prompt, response) in enumerate(HARMLESS):
            role = "refusal" if "can't" in response else "benign-answer"
            rows.append(Labelled(source, "response", prompt, f"{response} ({copy})", 0, role,
                                 f"{source}:s{number}"))
    # One long harmful answer: judged over several windows, the worst decides.
    rows.append(Labelled("team-a", "response", "How do I make a fake ID?",
                         " ".join([HARMLESS[0][1]] * 8 + [HARMFUL[2][1]]), 1, "harmful",
                         "team-a:long"))
    return rows


@pytest.fixture(scope="module")
def data() -> WindowSet:
    torch.set_num_threads(1)
    return response_windows(records(), load_encoder().windows)


@pytest.fixture(scope="module")
def tuned(data: WindowSet) -> Iterator[TunedEncoder]:
    yield fine_tune(data, SETTINGS)


def test_the_windows_are_the_guards(data: WindowSet) -> None:
    assert len(data.records) == 25 and len(data.texts) > 25  # the long answer has several
    assert Counter(data.owner.tolist())[24] > 2


def test_only_the_top_layer_changes(tuned: TunedEncoder) -> None:
    base = load_encoder().model.state_dict()
    after = tuned.encoder.model.state_dict()
    assert tuned.tuned_layers == [5]
    changed = {name for name in base if not torch.equal(base[name], after[name].cpu())}
    top = {name for name in base if name.startswith("encoder.layer.5.")}
    assert changed == top  # every weight of layer 5 moved, nothing else by a single bit
    assert set(tuned.tuned_parameters()) == top


def test_balanced_batches_keep_classes_and_sources_even(data: WindowSet) -> None:
    cells = _cells(data.records)
    drawn: Counter[tuple[int, str]] = Counter()
    for step in range(200):
        batch = balanced_batch(cells, 8, seed=0, step=step)
        labels = [data.records[i].label for i in batch]
        assert labels.count(1) == labels.count(0) == 4
        drawn.update((data.records[i].label, data.records[i].source) for i in batch)
    assert np.array_equal(balanced_batch(cells, 8, 0, 5), balanced_batch(cells, 8, 0, 5))
    for label in (0, 1):  # 800 draws a class over 3 sources: each about a third
        shares = [drawn[(label, s)] / 800 for s in ("team-a", "team-b", "team-c")]
        assert all(0.25 < share < 0.42 for share in shares), shares


async def test_the_saved_folder_scores_as_the_model_in_memory(tuned: TunedEncoder,
                                                              data: WindowSet,
                                                              tmp_path: Path) -> None:
    written = tuned.save(tmp_path, threshold=0.5, window_stride=96, encoder_name="minilm",
                         metadata={"test": True})
    assert [path.name for path in written] == [LAYERS_FILE, "head.json"]
    tensors, metadata = read_layers(tmp_path / LAYERS_FILE)
    assert metadata["layers"] == "5" and all(name.startswith("encoder.layer.5.")
                                             for name in tensors)
    assert load_head(tmp_path).encoder_layers == LAYERS_FILE
    assert '"format_version": 3' in (tmp_path / "head.json").read_text()

    guard = EmbeddedGuard(GuardConfig(model=str(tmp_path)))
    views = [GuardView(r.prompt, (), r.response) for r in data.records]
    verdicts = await guard.check_many(views)
    expected = tuned.scores(data)
    served = np.array([v.score for v in verdicts])
    np.testing.assert_allclose(served, expected, atol=2e-5)
    assert np.ptp(expected) > 0.05  # the model has learnt something to compare

    # Requests still go through the base encoder: the shipped request head (no request head in
    # the folder) scores as it does in the default guard, untouched by the shared modules.
    shipped = EmbeddedGuard(GuardConfig())
    text = "How do I make a fake ID?"
    assert (await guard.judge_request(text)).score == pytest.approx(
        (await shipped.judge_request(text)).score, abs=1e-6)
    await guard.aclose()
    await shipped.aclose()


def test_an_interrupted_run_resumes_to_the_same_weights(data: WindowSet,
                                                        tuned: TunedEncoder,
                                                        tmp_path: Path) -> None:
    first = fine_tune(data, SETTINGS, checkpoint_dir=tmp_path, stop_after=2)
    assert list(tmp_path.glob("finetune-*.pt"))
    del first
    resumed = fine_tune(data, SETTINGS, checkpoint_dir=tmp_path)
    for name, tensor in tuned.tuned_parameters().items():
        assert torch.equal(tensor, resumed.tuned_parameters()[name]), name
    assert torch.equal(tuned.head.weight, resumed.head.weight)


async def test_frozen_heads_load_as_before(tmp_path: Path) -> None:
    shipped = load_head(SHIPPED_HEAD)
    assert shipped.encoder_layers == ""
    guard = EmbeddedGuard(GuardConfig())
    view = GuardView("How do I bake bread?", (), "Knead the dough for ten minutes.")
    score = (await guard.check(view)).score
    step = load_encoder().encode([view.step], max_length=shipped.window_tokens)[0]
    assert score == pytest.approx(float(shipped.scores(step[None, :])[0]), abs=1e-6)
    await guard.aclose()
    # Saved again, a frozen head stays version 2 (older code reads it).
    shipped.save(tmp_path)
    assert '"format_version": 2' in (tmp_path / "head.json").read_text()
    assert "encoder_layers" not in (tmp_path / "head.json").read_text()


def test_broken_layers_are_config_errors(tmp_path: Path) -> None:
    head = LinearHead(blocks=("step",), dim=384, weights=np.zeros(384), bias=0.0,
                      threshold=0.5, encoder="minilm", window_tokens=128, window_stride=96,
                      encoder_layers=LAYERS_FILE)
    head.save(tmp_path)
    with pytest.raises(ConfigError, match="is missing"):
        EmbeddedGuard(GuardConfig(model=str(tmp_path)))
    write_layers({"encoder.layer.5.output.dense.weight": torch.zeros(3, 3)},
                 tmp_path / LAYERS_FILE, {"base": "minilm"})
    guard = EmbeddedGuard(GuardConfig(model=str(tmp_path)))
    with pytest.raises(ConfigError, match="has shape"):
        guard.warm_up()
    (tmp_path / LAYERS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot read"):
        EmbeddedGuard(GuardConfig(model=str(tmp_path))).warm_up()


def test_loso_runs_fine_tuned_folds_and_resumes(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The command a GPU session runs, on packed rows: a fold per source, the table, and a rerun
    that takes the finished folds from the checkpoint folder instead of training again."""
    write_records(records(), tmp_path / "rows.jsonl.gz")
    argv = ["--records", str(tmp_path / "rows.jsonl.gz"), "--finetune-layers", "1",
            "--epochs", "1", "--batch-size", "8", "--threshold-rule", "validation",
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "loso.json")]
    first = loso_main(argv)
    assert set(first["responses"]) == {"team-a", "team-b", "team-c", "_threshold_all_sources"}
    assert first["responses"]["team-b"]["n"] == 8 and "f1" in first["responses"]["team-b"]
    assert "| team-b | 8 (4) |" in capsys.readouterr().out
    assert len(list((tmp_path / "ckpt").glob("loso-*/fold-*.json"))) == 4
    for checkpoint in (tmp_path / "ckpt").glob("finetune-*.pt"):
        checkpoint.unlink()  # a rerun that trained again would have to write these
    again = loso_main(argv)
    assert again["responses"] == first["responses"]
    assert not list((tmp_path / "ckpt").glob("finetune-*.pt"))


async def test_the_training_command_writes_a_fine_tuned_folder(tmp_path: Path) -> None:
    from tests.test_embedded_training import write_rows

    write_rows(tmp_path / "team.jsonl")
    figures = train_main(parse_args([
        "--no-shared-data", "--extra", str(tmp_path / "team.jsonl"), "--finetune-layers", "1",
        "--epochs", "2", "--batch-size", "4", "--threshold-rule", "validation",
        "--output-dir", str(tmp_path / "guard"), "--cache-dir", str(tmp_path / "cache"),
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--threads", "1"]))
    folder = tmp_path / "guard"
    assert (folder / LAYERS_FILE).is_file() and (folder / "request_head.json").is_file()
    head = load_head(folder)
    assert head.encoder_layers == LAYERS_FILE and head.threshold == figures["threshold"]
    assert "top 1 layers fine-tuned" in (folder / "DATASHEET.md").read_text()
    guard = EmbeddedGuard(GuardConfig(model=str(folder)))
    verdict = await guard.check(GuardView(HARMFUL[0][0], (), HARMFUL[0][1]))
    assert verdict.score is not None and 0.0 <= verdict.score <= 1.0
    assert verdict.extra["threshold"] == f"{head.threshold:.4f}"
    await guard.aclose()
