"""Fine-tuning the embedded guard's encoder with its response head (``--finetune-layers N``).

The frozen recipe (``embedded_model.py``) fits a linear head on fixed MiniLM embeddings; here the
top ``N`` transformer layers of the encoder (6 = all of all-MiniLM-L6-v2's; the token embeddings
stay frozen) are trained together with that head, on the same 128-token windows of each
response (the first 6 and last 2 of a long one), with the same rule: a response's logit is its
worst window's (multiple-instance learning). The embedding is the guard's own (``SentenceEncoder
.embed``: mean pooling, L2 normalisation), so what is trained is what the guard computes.

Balance: every step draws half harmful and half harmless responses and, within a class, each
source with the same chance (a source's rows uniformly), so neither a big source nor the
majority class decides what is learnt; the loss is then an unweighted mean.

Determinism: the batch of step ``s`` is drawn from a generator seeded with ``(seed, s)``, the
head starts at zero and dropout is off, so a run is a function of (data, settings) and a
resumed run (``checkpoint_dir``) continues exactly where the interrupted one stopped. On CPU two
runs give the same weights bit for bit; on a GPU, up to the kernels' own non-determinism.

Output: the changed layers (``encoder_layers.safetensors``, fp16; the in-memory model is rounded
to fp16 at the end of training, so the figures measured are those of the weights shipped) and
``head.json`` naming them (``guardrail/guards/embedded/layers.py`` loads them at run time).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from offline.embedded_data import Labelled
from offline.embedded_features import WINDOW_TOKENS, WindowSet

Array = npt.NDArray[np.float64]
ThresholdRule = Literal["validation", "out-of-source"]


@dataclass(frozen=True)
class FineTuneSettings:
    layers: int = 2
    """The top N transformer layers trained (1 to the encoder's depth)."""
    epochs: float = 3.0
    """Steps = epochs x responses / batch_size (batches are drawn with replacement)."""
    batch_size: int = 32
    """Responses per step (each brings its windows, up to 8)."""
    encoder_learning_rate: float = 2e-5
    head_learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    """The encoder's learning rate rises from 0 over this share of the steps (the zero head
    learns first, so early gradients do not scramble the pretrained features), then both decay
    linearly to 0."""
    window_tokens: int = WINDOW_TOKENS
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 200
    score_batch: int = 256

    def fingerprint_fields(self) -> dict[str, Any]:
        """What decides the weights (not where or how often they are saved)."""
        return {key: value for key, value in asdict(self).items()
                if key not in ("device", "checkpoint_every", "score_batch")}


def balanced_batch(cells: dict[int, dict[str, npt.NDArray[np.int64]]], size: int, seed: int,
                   step: int) -> npt.NDArray[np.int64]:
    """Record indices for step ``step``: half of each class; within a class a source drawn
    uniformly, then one of its rows."""
    rng = np.random.default_rng([seed, step])
    chosen: list[int] = []
    for slot in range(size):
        label = slot % 2
        sources = sorted(cells[label])
        rows = cells[label][sources[int(rng.integers(len(sources)))]]
        chosen.append(int(rows[int(rng.integers(len(rows)))]))
    return np.asarray(chosen, dtype=np.int64)


def _cells(records: Sequence[Labelled]) -> dict[int, dict[str, npt.NDArray[np.int64]]]:
    cells: dict[int, dict[str, list[int]]] = {0: {}, 1: {}}
    for index, record in enumerate(records):
        cells[record.label].setdefault(record.source, []).append(index)
    if not cells[0] or not cells[1]:
        raise ValueError("fine-tuning needs harmful and harmless responses")
    return {label: {source: np.asarray(rows, dtype=np.int64) for source, rows in by.items()}
            for label, by in cells.items()}


def fingerprint(data: WindowSet, settings: FineTuneSettings, base: str) -> str:
    digest = hashlib.sha256(json.dumps([settings.fingerprint_fields(), base]).encode())
    for record in data.records:
        digest.update(f"{record.key}:{record.label}:{record.source}\n".encode())
    for text in data.texts:
        digest.update(hashlib.sha1(text.encode()).digest())
    return digest.hexdigest()[:16]


class TunedEncoder:
    """The guard's encoder with its top ``settings.layers`` layers trainable, and the response
    head on its embeddings (the logit is ``head(embedding * sqrt(dim))``: unit-scale features
    for the head's learning rate; the factor is folded into the weights when saved)."""

    def __init__(self, folder: Path | None, settings: FineTuneSettings) -> None:
        import torch

        from guardrail.guards.embedded.encoder import load_encoder, transformer_layers

        self.settings = settings
        self.folder = folder
        self.encoder = load_encoder(folder, max_length=max(256, settings.window_tokens))
        model = self.encoder.model
        layers = transformer_layers(model)
        if layers is None:
            raise ValueError(f"{self.encoder.path}: not a BERT-style encoder (no encoder.layer)")
        if not 0 < settings.layers <= len(layers):
            raise ValueError(f"--finetune-layers {settings.layers}: 1 to {len(layers)} for this "
                             "encoder (0 is the frozen recipe)")
        self.tuned_layers = list(range(len(layers) - settings.layers, len(layers)))
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for index in self.tuned_layers:
            for parameter in layers[index].parameters():
                parameter.requires_grad_(True)
        self.device = torch.device(settings.device)
        model.to(self.device)
        model.eval()  # no dropout: the forward pass trained is the guard's
        self.scale = math.sqrt(self.encoder.dim)
        self.head = torch.nn.Linear(self.encoder.dim, 1).to(self.device)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def tuned_parameters(self) -> dict[str, Any]:
        return {name: parameter for name, parameter in self.encoder.model.named_parameters()
                if parameter.requires_grad}

    def window_logits(self, texts: Sequence[str], autocast: bool = True) -> Any:
        """Training runs the encoder in bf16 on a GPU (``autocast``); scoring in float32, as
        the guard does on its CPU."""
        import torch

        batch = self.encoder.tokenize(texts, max_length=self.settings.window_tokens)
        batch = {key: value.to(self.device) for key, value in batch.items()}
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=autocast and self.device.type == "cuda"):
            embedded = self.encoder.embed(batch)
        return self.head(embedded.float() * self.scale).squeeze(-1)

    def window_scores(self, texts: Sequence[str]) -> Array:
        import torch

        out = np.zeros(len(texts))
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        size = self.settings.score_batch
        with torch.inference_mode():
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                logits = self.window_logits([texts[i] for i in chunk], autocast=False)
                out[chunk] = torch.sigmoid(logits.float()).cpu().numpy()
        return out

    def scores(self, data: WindowSet) -> Array:
        """Each record's worst window's score."""
        window = self.window_scores(data.texts)
        worst = np.zeros(len(data.records))
        np.maximum.at(worst, data.owner, window)
        return worst

    def round_to_fp16(self) -> None:
        """The trained layers as they will be shipped (fp16), so what is measured is what is
        shipped."""
        import torch

        with torch.no_grad():
            for parameter in self.tuned_parameters().values():
                parameter.copy_(parameter.half().float())

    def head_weights(self) -> tuple[Array, float]:
        weight = self.head.weight.detach().double().cpu().numpy()[0] * self.scale
        return weight, float(self.head.bias.detach().double().cpu().numpy()[0])

    def save(self, folder: Path, threshold: float, window_stride: int, encoder_name: str,
             metadata: dict[str, Any]) -> list[Path]:
        """``encoder_layers.safetensors`` and the ``head.json`` that names it."""
        from guardrail.guards.embedded.head import LinearHead
        from guardrail.guards.embedded.layers import LAYERS_FILE, write_layers

        layers = write_layers(self.tuned_parameters(), folder / LAYERS_FILE, {
            "base": encoder_name, "layers": ",".join(map(str, self.tuned_layers))})
        weights, bias = self.head_weights()
        head = LinearHead(
            blocks=("step",), dim=self.encoder.dim, weights=weights, bias=bias,
            threshold=round(threshold, 4), encoder=encoder_name,
            step_max_tokens=max(256, self.settings.window_tokens),
            window_tokens=self.settings.window_tokens, window_stride=window_stride,
            encoder_layers=LAYERS_FILE, metadata=metadata).save(folder)
        return [layers, head]


def fine_tune(data: WindowSet, settings: FineTuneSettings, encoder: Path | None = None,
              checkpoint_dir: Path | None = None, desc: str = "fine-tuning",
              stop_after: int | None = None) -> TunedEncoder:
    """Train the top layers and the head on ``data`` (see the module's docstring). With
    ``checkpoint_dir``, state is saved every ``checkpoint_every`` steps and a run with the same
    data and settings resumes from it. ``stop_after``: return after that many steps of this
    run (the checkpoint lets the next run finish the job)."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(settings.seed)
    tuner = TunedEncoder(encoder, settings)
    cells = _cells(data.records)
    windows: list[list[int]] = [[] for _ in data.records]
    for index, owner in enumerate(data.owner):
        windows[int(owner)].append(index)
    labels = torch.tensor([float(record.label) for record in data.records])
    steps = max(1, math.ceil(settings.epochs * len(data.records) / settings.batch_size))
    warmup = max(1, int(settings.warmup_fraction * steps))
    parameters = list(tuner.tuned_parameters().values())
    optimiser = torch.optim.AdamW([
        {"params": parameters, "lr": settings.encoder_learning_rate,
         "weight_decay": settings.weight_decay},
        {"params": list(tuner.head.parameters()), "lr": settings.head_learning_rate,
         "weight_decay": 0.0}])

    def encoder_rate(step: int) -> float:
        return min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))

    def head_rate(step: int) -> float:
        return max(0.0, (steps - step) / steps)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, [encoder_rate, head_rate])
    saved: Path | None = None
    start = 0
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        saved = checkpoint_dir / f"finetune-{fingerprint(data, settings, str(encoder))}.pt"
        if saved.is_file():
            state = torch.load(saved, map_location=tuner.device, weights_only=True)
            _restore(tuner, optimiser, schedule, state)
            start = int(state["step"])
    last = steps if stop_after is None else min(steps, start + stop_after)
    with tqdm(total=steps, initial=start, desc=desc, unit="step", mininterval=5,
              file=sys.stderr) as bar:
        for step in range(start, last):
            chosen = balanced_batch(cells, settings.batch_size, settings.seed, step)
            picked = [(slot, w) for slot, record in enumerate(chosen)
                      for w in windows[int(record)]]
            owner = torch.tensor([slot for slot, _ in picked], device=tuner.device)
            logits = tuner.window_logits([data.texts[w] for _, w in picked]).float()
            worst = torch.full((len(chosen),), -1e4, device=tuner.device).scatter_reduce(
                0, owner, logits, reduce="amax", include_self=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                worst, labels[torch.from_numpy(chosen)].to(tuner.device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_([*parameters, *tuner.head.parameters()], 1.0)
            optimiser.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
            done = step + 1
            if saved is not None and (done % settings.checkpoint_every == 0 or done == last):
                _save(tuner, optimiser, schedule, done, saved)
    if last == steps:
        tuner.round_to_fp16()
    return tuner


def _save(tuner: TunedEncoder, optimiser: Any, schedule: Any, step: int, path: Path) -> None:
    import torch

    state = {"step": step, "layers": tuner.tuned_parameters(),
             "head": tuner.head.state_dict(), "optimiser": optimiser.state_dict(),
             "schedule": schedule.state_dict()}
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)  # an interrupted save leaves the previous checkpoint whole


def _restore(tuner: TunedEncoder, optimiser: Any, schedule: Any, state: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        own = tuner.tuned_parameters()
        for name, tensor in state["layers"].items():
            own[name].copy_(tensor)
    tuner.head.load_state_dict(state["head"])
    optimiser.load_state_dict(state["optimiser"])
    schedule.load_state_dict(state["schedule"])


# -- the recipe: a fine-tuned head and its threshold -----------------------------------------


@dataclass
class FineTunedHead:
    tuner: TunedEncoder
    threshold: float
    out_of_source: Array | None = None

    def scores(self, data: WindowSet) -> Array:
        return self.tuner.scores(data)


@dataclass(frozen=True)
class FineTuneRecipe:
    """``train`` fine-tunes on a WindowSet and chooses the threshold by ``threshold_rule``:
    ``validation`` (fit on the training groups, choose on the held-out ones: one fit) or
    ``out-of-source`` (each source scored by a model fine-tuned without it, then one fit on
    everything: one fit per source family plus one)."""

    settings: FineTuneSettings = field(default_factory=FineTuneSettings)
    encoder: Path | None = None
    max_fpr: dict[str, float] = field(
        default_factory=lambda: {"refusal": 0.02, "benign-answer": 0.02})
    threshold_rule: ThresholdRule = "validation"
    val_fraction: float = 0.2
    checkpoint_dir: Path | None = None

    def fit(self, data: WindowSet, desc: str) -> TunedEncoder:
        return fine_tune(data, self.settings, self.encoder, self.checkpoint_dir, desc)

    def train(self, data: WindowSet) -> FineTunedHead:
        from offline.embedded_loso import source_families
        from offline.embedded_model import choose_threshold, held_out

        records = data.records
        families = source_families(records)
        if self.threshold_rule == "out-of-source" and len(families) >= 3:
            scores = np.zeros(len(records))
            for family in families:
                inside = [i for i, r in enumerate(records) if r.source in family]
                rest = [i for i, r in enumerate(records) if r.source not in family]
                fitted = self.fit(data.subset(rest), f"without {'+'.join(family)}")
                scores[inside] = fitted.scores(data.subset(inside))
                _release(fitted)
            tuner = self.fit(data, "all sources")
            return FineTunedHead(tuner, choose_threshold(records, scores, self.max_fpr), scores)
        val = [i for i, r in enumerate(records)
               if held_out(r.group, self.settings.seed, self.val_fraction)]
        val_set = set(val)
        train = [i for i in range(len(records)) if i not in val_set]
        checked = val if len({records[i].label for i in val}) == 2 else train
        tuner = self.fit(data.subset(train), "training groups")
        part = data.subset(checked)
        return FineTunedHead(tuner, choose_threshold(part.records, tuner.scores(part),
                                                     self.max_fpr))


def _release(tuner: TunedEncoder) -> None:
    """Give a finished fold's GPU memory back before the next one."""
    import torch

    del tuner.encoder, tuner.head
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
