"""Embeddings of labelled rows as the embedded guard sees them.

A response is cut into overlapping token windows (``window_tokens``, every ``window_stride``
tokens; the first and last few only, in training) and each window is embedded; the prompt is
embedded once (its last ``request_tokens`` tokens). A request row is its prompt's embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from offline.embedded_data import Labelled
from offline.embedding_cache import EmbeddingCache, Vectors

WINDOW_TOKENS = 128
WINDOW_STRIDE = 96
TRAIN_WINDOWS = (6, 2)
"""Training judges the first 6 and last 2 windows of a long response (inference: all)."""
REQUEST_TOKENS = 128


@dataclass
class ResponseSet:
    records: list[Labelled]
    windows: Vectors
    """One row per window, in record order."""
    owner: npt.NDArray[np.int64]
    """The record index of each window."""
    prompts: Vectors
    """One row per record: its prompt."""

    def subset(self, chosen: Sequence[int]) -> ResponseSet:
        index = np.asarray(chosen, dtype=np.int64)
        mapping = -np.ones(len(self.records), dtype=np.int64)
        mapping[index] = np.arange(len(index))
        keep = np.isin(self.owner, index)
        order = np.argsort(mapping[self.owner[keep]], kind="stable")
        return ResponseSet([self.records[i] for i in index], self.windows[keep][order],
                           mapping[self.owner[keep]][order], self.prompts[index])


@dataclass
class WindowSet:
    """Response rows and the window texts the guard judges them by."""

    records: list[Labelled]
    texts: list[str]
    owner: npt.NDArray[np.int64]
    """The record index of each window, in record order."""

    def subset(self, chosen: Sequence[int]) -> WindowSet:
        index = np.asarray(chosen, dtype=np.int64)
        mapping = -np.ones(len(self.records), dtype=np.int64)
        mapping[index] = np.arange(len(index))
        keep = np.flatnonzero(np.isin(self.owner, index))
        order = keep[np.argsort(mapping[self.owner[keep]], kind="stable")]
        return WindowSet([self.records[i] for i in index], [self.texts[i] for i in order],
                         mapping[self.owner[order]])


def response_windows(records: Sequence[Labelled], split: Callable[..., list[str]],
                     limit: tuple[int, int] | None = TRAIN_WINDOWS,
                     window_tokens: int = WINDOW_TOKENS,
                     window_stride: int = WINDOW_STRIDE) -> WindowSet:
    """Each response cut as the guard cuts a step (``SentenceEncoder.windows``)."""
    texts: list[str] = []
    owner: list[int] = []
    for index, record in enumerate(records):
        for window in split(record.response, window_tokens, window_stride, limit):
            texts.append(window.strip() or record.response)
            owner.append(index)
    return WindowSet(list(records), texts, np.asarray(owner, dtype=np.int64))


def embed_responses(records: Sequence[Labelled], cache: EmbeddingCache,
                    limit: tuple[int, int] | None = TRAIN_WINDOWS,
                    window_tokens: int = WINDOW_TOKENS, window_stride: int = WINDOW_STRIDE,
                    request_tokens: int = REQUEST_TOKENS) -> ResponseSet:
    cut = response_windows(records, cache.encoder.windows, limit, window_tokens, window_stride)
    windows = cache.encode(cut.texts, window_tokens, "right", desc="response windows")
    prompts = cache.encode([record.prompt for record in records], request_tokens, "left",
                           desc="prompts")
    return ResponseSet(list(records), windows, cut.owner, prompts)


def embed_requests(records: Sequence[Labelled], cache: EmbeddingCache,
                   request_tokens: int = REQUEST_TOKENS) -> Vectors:
    return cache.encode([record.prompt for record in records], request_tokens, "left",
                        desc="requests")
