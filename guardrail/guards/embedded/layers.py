"""Fine-tuned encoder layers stored beside a head: ``encoder_layers.safetensors``.

A head trained with ``--finetune-layers N`` (offline/train_embedded_guard.py) changes the top N
transformer layers of its encoder. Only those layers are shipped (fp16, a few MB each), under
their transformers names (``encoder.layer.5.attention.self.query.weight``, ...); at load time they
replace the matching weights of the base encoder (the packaged all-MiniLM-L6-v2, or the head
folder's own ``encoder/``), and every other weight stays the base's. A file whose names or shapes
do not fit the base is a ConfigError, never a silently different model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from guardrail.errors import ConfigError

LAYERS_FORMAT = "reasoning-guardrail/embedded-encoder-layers"
LAYERS_FILE = "encoder_layers.safetensors"
_LAYER_NAME = re.compile(r"^encoder\.layer\.(\d+)\.")


def layer_indices(names: Mapping[str, Any] | list[str]) -> list[int]:
    """The transformer layers that the parameter ``names`` belong to, in order."""
    found = {int(match.group(1)) for name in names if (match := _LAYER_NAME.match(name))}
    return sorted(found)


def write_layers(tensors: Mapping[str, torch.Tensor], path: str | Path,
                 metadata: Mapping[str, str]) -> Path:
    """Store ``tensors`` (transformer-layer weights) as fp16 safetensors."""
    from safetensors.torch import save_file

    outside = [name for name in tensors if not _LAYER_NAME.match(name)]
    if outside:
        raise ValueError(f"only transformer-layer weights are stored, not {outside[:3]}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    half = {name: tensor.detach().to("cpu", torch.float16).contiguous()
            for name, tensor in sorted(tensors.items())}
    save_file(half, str(target), metadata={"format": LAYERS_FORMAT, **metadata})
    return target


def read_layers(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors in float32, metadata); any defect is a ConfigError naming the file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    file = Path(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as error:
        raise ConfigError(f"{file}: cannot read the fine-tuned encoder layers ({error})") from None
    if metadata.get("format") != LAYERS_FORMAT:
        raise ConfigError(f"{file}: not fine-tuned encoder layers (format {LAYERS_FORMAT!r})")
    if not tensors or any(not _LAYER_NAME.match(name) for name in tensors):
        raise ConfigError(f"{file}: holds no transformer layers, or weights outside them")
    return {name: tensor.to(torch.float32) for name, tensor in tensors.items()}, metadata


def apply_layers(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
                 source: str | Path) -> list[int]:
    """Copy ``tensors`` into ``model`` in place; every name must be one of its parameters, with
    the same shape. Returns the layers replaced."""
    own = model.state_dict()
    for name, tensor in tensors.items():
        if name not in own:
            raise ConfigError(f"{source}: {name} is not a weight of this encoder (a different "
                              "architecture than the layers were trained on)")
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ConfigError(f"{source}: {name} has shape {tuple(tensor.shape)}, the encoder's "
                              f"is {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].dtype))
    return layer_indices(list(tensors))
