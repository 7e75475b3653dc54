"""The embedded guard (``guard.kind: embedded``, the default): a small sentence encoder and
classifier heads that run on the proxy's own CPU.

- ``guard``: the guard itself (micro-batched checks, the request head, ``guard.model``);
- ``encoder``: the sentence encoder, loaded with plain transformers;
- ``head``: the classifier heads and the one featurizer shared by training and inference;
- ``layers``: fine-tuned encoder layers stored beside a head (``encoder_layers.safetensors``);
- ``weights/``: the shipped heads and their ``DATASHEET.md``.
"""

from guardrail.guards.embedded.guard import EmbeddedGuard

__all__ = ["EmbeddedGuard"]
