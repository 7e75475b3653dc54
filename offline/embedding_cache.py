"""Sentence embeddings cached on disk, so that training and evaluation rerun in seconds.

Keyed by the encoder's fingerprint, the token limit, the truncation side and the text; a text
that fits within the limit is stored once, whatever the limit. New vectors go to a new shard
file every ``flush_every`` texts (several processes may fill one cache; an interrupted run loses
at most one shard's worth of work).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from guardrail.guards.embedded.encoder import SentenceEncoder, Truncation

Vectors = npt.NDArray[np.float32]


def encoder_fingerprint(folder: Path) -> str:
    """A short hash of the encoder's weights and tokenizer files."""
    digest = hashlib.sha256()
    for name in sorted(["config.json", "model.safetensors", "pytorch_model.bin",
                        "tokenizer.json", "vocab.txt"]):
        file = folder / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(str(file.stat().st_size).encode())
            with file.open("rb") as handle:
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


class EmbeddingCache:
    def __init__(self, folder: Path, encoder: SentenceEncoder, fingerprint: str,
                 flush_every: int = 512) -> None:
        self.folder = folder / fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.encoder = encoder
        self.flush_every = flush_every
        self.table: dict[str, Vectors] = {}
        self.encoded = 0
        self.seconds = 0.0
        self.reload()

    def reload(self) -> None:
        for shard in sorted(self.folder.glob("shard-*.npz")):
            try:
                with np.load(shard) as stored:
                    self.table.update(zip(stored["keys"].tolist(), stored["vectors"],
                                          strict=True))
            except (OSError, ValueError, KeyError):
                continue  # a shard being written by another process right now

    def _key(self, text: str, max_length: int, truncation: Truncation) -> str:
        tokens = len(self.encoder._tokenizer(text, add_special_tokens=True)["input_ids"])
        scope = "all" if tokens <= max_length else f"{max_length}{truncation}"
        return hashlib.sha1(f"{scope}\x00{text}".encode()).hexdigest()

    def encode(self, texts: Sequence[str], max_length: int, truncation: Truncation = "right",
               desc: str = "encoding") -> Vectors:
        keys = [self._key(text, max_length, truncation) for text in texts]
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in self.table and key not in missing:
                missing[key] = text
        if missing:
            items = list(missing.items())
            with tqdm(total=len(items), desc=desc, unit="text", mininterval=5) as bar:
                for start in range(0, len(items), self.flush_every):
                    chunk = items[start : start + self.flush_every]
                    began = time.perf_counter()
                    vectors = self.encoder.encode([text for _, text in chunk],
                                                  max_length=max_length, truncation=truncation)
                    self.seconds += time.perf_counter() - began
                    self.encoded += len(chunk)
                    for (key, _), vector in zip(chunk, vectors, strict=True):
                        self.table[key] = vector
                    self._write([key for key, _ in chunk], vectors)
                    bar.update(len(chunk))
        if not keys:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        return np.stack([self.table[key] for key in keys])

    def _write(self, keys: list[str], vectors: Vectors) -> None:
        name = f"shard-{time.time_ns()}-{os.getpid()}"
        temporary = self.folder / f"{name}.tmp.npz"
        np.savez(temporary, keys=np.array(keys), vectors=vectors.astype(np.float32))
        temporary.replace(self.folder / f"{name}.npz")
