"""The embedded guard's classifier head and the one function that turns guard views into its
input, shared by training (offline/train_embedded_guard.py) and inference (embedded.py) so the
two can never drift apart.

Input format ``blocks-v1``: each view becomes a concatenation of named blocks of sentence
embeddings (each ``dim`` wide):

- ``step``: the step under judgement;
- ``context``: the normalised mean of the embeddings of the earlier steps in the view (zeros when
  there are none), so the steps a stream has already checked are reused, not re-encoded;
- ``request``: the user's request, its last ``request_max_tokens`` tokens;
- ``step*request`` / ``step*context``: element-wise products, which let a linear head ask "is this
  step on the request's topic" rather than only "does it sound harmful".

A head uses any of these blocks; one that uses only ``request`` (the request head,
``request_head.json``) never encodes a step.

Windows (format version 2): a head with ``window_tokens`` judges a step longer than that over
overlapping windows (``window_tokens`` long, one every ``window_stride`` tokens); the step's score
is its worst window's. Long steps are not cut off: harm at the end of a long answer counts. A
version-1 head (no windows) cuts a step at ``step_max_tokens``, as before.

Fine-tuned layers (format version 3): a head with ``encoder_layers`` was trained on an encoder
whose top layers were fine-tuned with it; the file it names (beside the head) holds those
layers, and the guard embeds steps with them (``layers.py``). Requests are still embedded by the
base encoder. Only such a head is written as version 3, so older code refuses it rather than
scoring it on the wrong encoder.

The head is logistic regression on those features: ``score = sigmoid(w . x + b)``. It is stored as
``head.json`` (numbers as text, so it diffs and needs no pickle).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from guardrail.errors import ConfigError
from guardrail.guards.base import GuardView

HEAD_FORMAT = "reasoning-guardrail/embedded-head"
FORMAT_VERSION = 2
LAYERS_FORMAT_VERSION = 3
"""Written instead of FORMAT_VERSION by a head that names fine-tuned encoder layers."""
READABLE_VERSIONS = (1, 2, 3)
INPUT_FORMAT = "blocks-v1"
HEAD_FILE = "head.json"
BLOCKS = ("step", "context", "request", "step*request", "step*context")

Embeddings = npt.NDArray[np.float32]
EncodeFn = Callable[[Sequence[str]], Embeddings]
SplitFn = Callable[[str], list[str]]


@dataclass(frozen=True)
class LinearHead:
    blocks: tuple[str, ...]
    dim: int
    weights: npt.NDArray[np.float64]
    bias: float
    threshold: float
    """Calibrated on a validation split: a step is unsafe when its score reaches this."""
    encoder: str
    """Name of the encoder the head was trained on; another encoder needs another head."""
    request_max_tokens: int = 128
    step_max_tokens: int = 256
    window_tokens: int = 0
    """0: the step is embedded whole (its first ``step_max_tokens`` tokens); else windows."""
    window_stride: int = 0
    encoder_layers: str = ""
    """The file (beside the head) of the fine-tuned encoder layers its steps are embedded
    with; empty: the base encoder as it is."""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [block for block in self.blocks if block not in BLOCKS]
        if unknown or not self.blocks:
            raise ConfigError(f"embedded head: unknown feature blocks {unknown or '(none)'}")
        if self.weights.shape != (len(self.blocks) * self.dim,):
            raise ConfigError(
                f"embedded head: {self.weights.shape[0]} weights for "
                f"{len(self.blocks)} blocks of {self.dim}"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"embedded head: threshold {self.threshold} outside [0, 1]")
        if self.window_tokens and not 0 < self.window_stride <= self.window_tokens - 2:
            raise ConfigError(f"embedded head: window stride {self.window_stride} must be 1 to "
                              f"{self.window_tokens - 2} for {self.window_tokens}-token windows")
        if self.encoder_layers and (Path(self.encoder_layers).name != self.encoder_layers
                                    or self.blocks != ("step",)):
            raise ConfigError("embedded head: encoder_layers must be a file name beside the head, "
                              "and only a head on the step alone may have them")

    @property
    def uses_step(self) -> bool:
        """Whether the step is embedded at all (a request-only head never encodes it)."""
        return any("step" in block or "context" in block for block in self.blocks)

    @property
    def uses_context(self) -> bool:
        return any("context" in block for block in self.blocks)

    @property
    def uses_request(self) -> bool:
        return any("request" in block for block in self.blocks)

    def assemble(
        self, step: Embeddings | None, context: Embeddings | None, request: Embeddings | None
    ) -> npt.NDArray[np.float32]:
        """The feature matrix for rows of step / context / request embeddings."""
        parts: dict[str, Embeddings | None] = {"step": step, "context": context,
                                                "request": request}
        columns: list[npt.NDArray[np.float32]] = []
        for block in self.blocks:
            names = block.split("*")
            arrays = [parts[name] for name in names]
            if any(array is None for array in arrays):
                raise ValueError(f"block {block} needs {names}")
            product = arrays[0]
            for array in arrays[1:]:
                product = product * array  # type: ignore[operator]
            columns.append(np.asarray(product, dtype=np.float32))
        return np.concatenate(columns, axis=1)

    def scores(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        logits = features.astype(np.float64) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def to_json(self) -> dict[str, Any]:
        layers = {"encoder_layers": self.encoder_layers} if self.encoder_layers else {}
        return {
            "format": HEAD_FORMAT,
            "format_version": LAYERS_FORMAT_VERSION if self.encoder_layers else FORMAT_VERSION,
            "input_format": INPUT_FORMAT,
            "encoder": self.encoder,
            "dim": self.dim,
            "blocks": list(self.blocks),
            "request_max_tokens": self.request_max_tokens,
            "step_max_tokens": self.step_max_tokens,
            "window_tokens": self.window_tokens,
            "window_stride": self.window_stride,
            **layers,
            "threshold": self.threshold,
            "bias": self.bias,
            "weights": [float(f"{value:.7g}") for value in self.weights],
            "metadata": self.metadata,
        }

    def save(self, folder: str | Path, file_name: str = HEAD_FILE) -> Path:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        target = path / file_name
        target.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        return target


def load_head(path: str | Path) -> LinearHead:
    """Read ``head.json`` (or a folder holding one); any defect is a ConfigError naming it."""
    file = Path(path)
    if file.is_dir():
        file = file / HEAD_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{file}: cannot read the embedded guard's head ({error})") from None
    except ValueError as error:
        raise ConfigError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != HEAD_FORMAT:
        raise ConfigError(f"{file}: not an embedded guard head (format {HEAD_FORMAT!r})")
    if (data.get("format_version") not in READABLE_VERSIONS
            or data.get("input_format") != INPUT_FORMAT):
        raise ConfigError(
            f"{file}: head version {data.get('format_version')}/{data.get('input_format')} "
            f"unsupported (this code reads {READABLE_VERSIONS}/{INPUT_FORMAT})"
        )
    try:
        return LinearHead(
            blocks=tuple(str(block) for block in data["blocks"]),
            dim=int(data["dim"]),
            weights=np.asarray(data["weights"], dtype=np.float64),
            bias=float(data["bias"]),
            threshold=float(data["threshold"]),
            encoder=str(data["encoder"]),
            request_max_tokens=int(data.get("request_max_tokens", 128)),
            step_max_tokens=int(data.get("step_max_tokens", 256)),
            window_tokens=int(data.get("window_tokens", 0)),
            window_stride=int(data.get("window_stride", 0)),
            encoder_layers=str(data.get("encoder_layers", "")),
            metadata=dict(data.get("metadata", {})),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{file}: malformed head ({type(error).__name__}: {error})") from None


def clean(text: str) -> str:
    """What of a step or request is embedded: surrounding white space carries no meaning."""
    return text.strip()


class _LRU:
    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Embeddings] = OrderedDict()

    def get(self, key: str) -> Embeddings | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: Embeddings) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if self.capacity is not None:
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class ViewFeaturizer:
    """Turns guard views into head features, remembering recent embeddings.

    A stream sends the same request with every step, and each step comes back as context for
    the next few: with the memory, a check costs about one short encoding. Not thread-safe; the
    guard calls it from one worker at a time.
    """

    def __init__(
        self,
        head: LinearHead,
        encode_steps: EncodeFn,
        encode_requests: EncodeFn,
        memory: int | None = 4096,
        split: SplitFn | None = None,
    ) -> None:
        """``split`` cuts a step into windows (the head's ``window_tokens``); None judges every
        step whole."""
        self.head = head
        self._split = split
        self._encode_steps = encode_steps
        self._encode_requests = encode_requests
        self._steps = _LRU(memory)
        self._requests = _LRU(None if memory is None else max(16, memory // 16))

    def features(self, views: Sequence[GuardView]) -> npt.NDArray[np.float32]:
        head = self.head
        steps = [clean(view.step) for view in views]
        contexts = [[clean(text) for text in view.context if clean(text)] for view in views]
        requests = [clean(view.request) for view in views]
        step_matrix: Embeddings | None = None
        context_matrix: Embeddings | None = None
        if head.uses_step:
            step_texts = list(steps)
            if head.uses_context:
                step_texts += [text for context in contexts for text in context]
            step_table = self._lookup(self._steps, step_texts, self._encode_steps)
            step_matrix = np.stack([step_table[text] for text in steps])
            if head.uses_context:
                context_matrix = np.zeros_like(step_matrix)
                for row, context in enumerate(contexts):
                    if context:
                        mean = np.mean([step_table[text] for text in context], axis=0)
                        norm = float(np.linalg.norm(mean))
                        if norm > 0:
                            context_matrix[row] = mean / norm
        request_matrix: Embeddings | None = None
        if head.uses_request:
            request_table = self._lookup(self._requests, requests, self._encode_requests)
            request_matrix = np.stack([request_table[text] for text in requests])
        return head.assemble(step_matrix, context_matrix, request_matrix)

    def request_embeddings(self, texts: Sequence[str]) -> Embeddings:
        """Embeddings of requests (or of any text embedded as a request is), from the memory
        where a check has already embedded them."""
        cleaned = [clean(text) for text in texts]
        table = self._lookup(self._requests, cleaned, self._encode_requests)
        return np.stack([table[text] for text in cleaned])

    def scores(self, views: Sequence[GuardView]) -> list[float]:
        if self._split is None or not self.head.uses_step:
            return [float(score) for score in self.head.scores(self.features(views))]
        # Each step judged over its windows (a short step is one); the worst one decides.
        owners: list[int] = []
        windowed: list[GuardView] = []
        for index, view in enumerate(views):
            for window in self._split(clean(view.step)) or [view.step]:
                owners.append(index)
                windowed.append(GuardView(view.request, view.context, window, view.channel))
        window_scores = self.head.scores(self.features(windowed))
        worst = [0.0] * len(views)
        for owner, score in zip(owners, window_scores, strict=True):
            worst[owner] = max(worst[owner], float(score))
        return worst

    @staticmethod
    def _lookup(memory: _LRU, texts: Sequence[str], encode: EncodeFn) -> dict[str, Embeddings]:
        table: dict[str, Embeddings] = {}
        missing: dict[str, None] = {}  # ordered set
        for text in texts:
            if text in table or text in missing:
                continue
            cached = memory.get(text)
            if cached is None:
                missing[text] = None
            else:
                table[text] = cached
        if missing:
            encoded = encode(list(missing))
            for text, row in zip(missing, encoded, strict=True):
                memory.put(text, row)
                table[text] = row
        return table


CATEGORY_FORMAT = "reasoning-guardrail/embedded-categories"
CATEGORY_FILE = "categories.json"


@dataclass(frozen=True)
class CategoryHead:
    """Which Llama Guard 3 hazards (S1-S14) an unsafe step falls under: one logistic head per
    code on the request's embedding (the step's when there is no request). Consulted only once
    the step head has judged a step unsafe; codes scoring at least ``threshold`` are named."""

    codes: tuple[str, ...]
    weights: npt.NDArray[np.float64]
    """Shape (len(codes), dim)."""
    bias: npt.NDArray[np.float64]
    threshold: float = 0.5
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights.ndim != 2 or self.weights.shape[0] != len(self.codes) \
                or self.bias.shape != (len(self.codes),):
            raise ConfigError(f"embedded categories: weights {self.weights.shape} and bias "
                              f"{self.bias.shape} do not fit {len(self.codes)} codes")

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    def name(self, vectors: Embeddings) -> list[tuple[str, ...]]:
        """The codes each row of embeddings falls under (possibly none)."""
        if not len(vectors):
            return []
        scores = 1.0 / (1.0 + np.exp(-(vectors.astype(np.float64) @ self.weights.T + self.bias)))
        return [tuple(code for code, score in zip(self.codes, row, strict=True)
                      if score >= self.threshold) for row in scores]

    def save(self, folder: str | Path) -> Path:
        target = Path(folder) / CATEGORY_FILE
        target.write_text(json.dumps({
            "format": CATEGORY_FORMAT, "codes": list(self.codes), "threshold": self.threshold,
            "bias": [float(f"{value:.7g}") for value in self.bias],
            "weights": [[float(f"{value:.7g}") for value in row] for row in self.weights],
            "metadata": self.metadata}, indent=1) + "\n", encoding="utf-8")
        return target


def load_categories(path: str | Path) -> CategoryHead:
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("format") != CATEGORY_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, not {CATEGORY_FORMAT!r}")
        return CategoryHead(codes=tuple(str(code) for code in data["codes"]),
                            weights=np.asarray(data["weights"], dtype=np.float64),
                            bias=np.asarray(data["bias"], dtype=np.float64),
                            threshold=float(data.get("threshold", 0.5)),
                            metadata=dict(data.get("metadata", {})))
    except OSError as error:
        raise ConfigError(f"{file}: cannot read the category head ({error})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ConfigError(f"{file}: malformed category head ({error})") from None
