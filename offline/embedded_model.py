"""Fitting the embedded guard's heads on cached embeddings, and the metrics that judge them.

Response head: a linear head on each window's features (``window``, ``request``,
``window*request``: the LinearHead's ``step`` blocks, the window playing the step); a response's
score is its worst window's (multiple-instance learning: the loss is on the response's max
logit, so a harmful response is not blamed for its disclaimer window, and a refusal is judged on
all of it). Request head: a linear head on the request's embedding.

Both are trained with a weighted logistic loss in which each class carries half the weight and,
within a class, every source the same share (``source_balance`` = 1; 0 weights rows alike), so
neither a big source nor the majority class decides what the head learns.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from offline.embedded_data import Labelled
from offline.embedded_features import ResponseSet

Array = npt.NDArray[np.float64]
Vectors = npt.NDArray[np.float32]


@dataclass(frozen=True)
class FitSettings:
    l2: float = 1e-2
    steps: int = 300
    learning_rate: float = 0.05
    source_balance: float = 1.0
    seed: int = 0


def balanced_weights(records: Sequence[Labelled], source_balance: float) -> Array:
    """Half the weight per class; within a class, source s carries (n_s ** balance) / sum."""
    counts = Counter((record.label, record.source) for record in records)
    weights = np.zeros(len(records))
    for label in (0, 1):
        sources = {source: n for (lab, source), n in counts.items() if lab == label}
        shares = {source: n ** (1 - source_balance) for source, n in sources.items()}
        total = sum(shares.values())
        for index, record in enumerate(records):
            if record.label == label:
                weights[index] = 0.5 * shares[record.source] / total / sources[record.source]
    normalised: Array = weights / weights.sum()
    return normalised


def window_features(data: ResponseSet, blocks: Sequence[str]) -> Vectors:
    request = data.prompts[data.owner]
    parts = {"step": data.windows, "request": request, "step*request": data.windows * request}
    return np.concatenate([parts[block] for block in blocks], axis=1).astype(np.float32)


def fit_mil(features: Vectors, owner: npt.NDArray[np.int64], labels: Array, weights: Array,
            settings: FitSettings) -> tuple[Array, float]:
    """Weights and bias (for the raw features) of a linear window head whose response logit is
    the max over its windows; Adam on standardised features, full batch."""
    import torch

    torch.manual_seed(settings.seed)
    mean = features.mean(axis=0)
    std = features.std(axis=0) + 1e-6
    x = torch.from_numpy(((features - mean) / std).astype(np.float32))
    index = torch.from_numpy(owner)
    y = torch.from_numpy(labels.astype(np.float32))
    w = torch.from_numpy(weights.astype(np.float32))
    beta = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.Adam([beta, bias], lr=settings.learning_rate)
    units = len(labels)
    for _ in range(settings.steps):
        optimiser.zero_grad()
        logits = x @ beta + bias
        worst = torch.full((units,), -1e9).scatter_reduce(0, index, logits, reduce="amax",
                                                          include_self=True)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(worst, y, reduction="none")
                * w).sum() + settings.l2 * (beta * beta).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    scaled = beta.detach().numpy().astype(np.float64) / std
    return scaled, float(bias.detach().numpy()[0]) - float(scaled @ mean)


def fit_linear(features: Vectors, labels: Array, weights: Array,
               settings: FitSettings) -> tuple[Array, float]:
    """The same with one instance per unit (the request head)."""
    return fit_mil(features, np.arange(len(labels), dtype=np.int64), labels, weights, settings)


def sigmoid(logits: Array) -> Array:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))


def response_scores(data: ResponseSet, blocks: Sequence[str], weights: Array,
                    bias: float) -> Array:
    window = sigmoid(window_features(data, blocks).astype(np.float64) @ weights + bias)
    worst = np.zeros(len(data.records))
    np.maximum.at(worst, data.owner, window)
    return worst


# -- splits and thresholds ----------------------------------------------------------------------


def held_out(group: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def choose_threshold(records: Sequence[Labelled], scores: Array,
                     max_fpr: dict[str, float]) -> float:
    """The threshold with the best F1 (harmful vs harmless) among those that flag at most
    ``max_fpr[role]`` of the harmless rows of each named role; the highest candidate if none
    qualifies."""
    labels = np.array([record.label for record in records])
    roles = np.array([record.role for record in records])
    best: tuple[float, float] | None = None
    for candidate in np.unique(np.round(scores, 4)):
        flagged = scores >= candidate
        if any((roles == role).any() and flagged[(roles == role) & (labels == 0)].mean() > cap
               for role, cap in max_fpr.items() if ((roles == role) & (labels == 0)).any()):
            continue
        f1 = prf(labels, flagged)["f1"]
        if best is None or f1 > best[0]:
            best = (f1, float(candidate))
    return best[1] if best is not None else 1.0


# -- metrics ------------------------------------------------------------------------------------


def prf(labels: npt.NDArray[np.int64], flagged: npt.NDArray[np.bool_]) -> dict[str, float]:
    tp = int((flagged & (labels == 1)).sum())
    fp = int((flagged & (labels == 0)).sum())
    fn = int((~flagged & (labels == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def auroc(labels: npt.NDArray[np.int64], scores: Array) -> float | None:
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    if not len(positives) or not len(negatives):
        return None
    order = np.argsort(np.concatenate([positives, negatives]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    total = ranks[: len(positives)].sum() - len(positives) * (len(positives) + 1) / 2
    return round(float(total / (len(positives) * len(negatives))), 4)


def report(records: Sequence[Labelled], scores: Array, threshold: float) -> dict[str, object]:
    """F1 etc. where both classes are present; the flagged share of each role."""
    labels = np.array([record.label for record in records], dtype=np.int64)
    flagged = scores >= threshold
    out: dict[str, object] = {"n": len(records), "harmful": int(labels.sum())}
    if labels.any() and (labels == 0).any():
        out |= prf(labels, flagged) | {"auroc": auroc(labels, scores)}
    for role in sorted({record.role for record in records}):
        chosen = np.array([record.role == role for record in records])
        out[f"flagged_{role}"] = {"rate": round(float(flagged[chosen].mean()), 4),
                                  "flagged": int(flagged[chosen].sum()),
                                  "n": int(chosen.sum())}
    return out


# -- categories ---------------------------------------------------------------------------------


def fit_categories(vectors: Vectors, codes: Sequence[tuple[str, ...]], settings: FitSettings,
                   min_examples: int = 15) -> tuple[list[str], Array, Array]:
    """One-vs-rest logistic heads over the harmful rows that carry hazard codes: for each code
    with at least ``min_examples`` rows, those rows against the other coded rows (each side
    half the weight). Returns (codes, weights (k, dim), biases (k,))."""
    counts = Counter(code for row in codes for code in row)
    kept = sorted(code for code, n in counts.items() if n >= min_examples)
    weights: list[Array] = []
    biases: list[float] = []
    for code in kept:
        labels = np.array([float(code in row) for row in codes])
        share = np.where(labels == 1, 0.5 / labels.sum(), 0.5 / (len(labels) - labels.sum()))
        w, b = fit_linear(vectors, labels, share, settings)
        weights.append(w)
        biases.append(b)
    return kept, np.array(weights), np.array(biases)


def category_report(truth: Sequence[tuple[str, ...]], named: Sequence[tuple[str, ...]],
                    codes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per code: precision and recall of naming it; plus how often a row got one right code."""
    out: dict[str, dict[str, float]] = {}
    for code in codes:
        tp = sum(code in t and code in n for t, n in zip(truth, named, strict=True))
        fp = sum(code not in t and code in n for t, n in zip(truth, named, strict=True))
        fn = sum(code in t and code not in n for t, n in zip(truth, named, strict=True))
        out[code] = {"precision": round(tp / (tp + fp), 3) if tp + fp else 0.0,
                     "recall": round(tp / (tp + fn), 3) if tp + fn else 0.0, "n": tp + fn}
    hit = sum(bool(set(t) & set(n)) for t, n in zip(truth, named, strict=True))
    out["any right"] = {"rate": round(hit / len(truth), 3) if truth else 0.0, "n": len(truth)}
    return out
