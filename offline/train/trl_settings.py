"""What ``sft`` and ``dpo`` do alike to the TRL config mappings (``sft:`` / ``dpo:``, or
``--sft`` / ``--dpo KEY=VALUE``): values read as YAML take their field's type, and precision
and memory pinning default to what the machine has."""

from __future__ import annotations

from typing import Any

from offline.train.errors import TrainInputError


def coerce(name: str, value: Any, default: Any) -> Any:
    """YAML 1.1 reads ``5e-6`` (no dot) as a string, which TRL would pass on to the optimizer;
    a numeric field takes it as its number. ``name`` is the key as the user wrote it."""
    if isinstance(default, bool) or not isinstance(default, int | float):
        return value
    if isinstance(value, str) or (isinstance(default, float) and isinstance(value, int)
                                  and not isinstance(value, bool)):
        try:
            return type(default)(value)
        except ValueError:
            raise TrainInputError(f"{name}: a {type(default).__name__}, not {value!r}") from None
    return value


def machine_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """TRL defaults to bf16, which stops a run on a machine without a bf16 GPU (a laptop, a
    V100): there, fp32. And the dataloader pins memory, which warns where no GPU is. A value
    given in ``settings`` (``bf16``, ``fp16``, ``dataloader_pin_memory``) wins."""
    import torch

    cuda = torch.cuda.is_available()
    defaults: dict[str, Any] = {"dataloader_pin_memory": cuda}
    if "bf16" not in settings and "fp16" not in settings:
        defaults["bf16"] = cuda and torch.cuda.is_bf16_supported()
    return {key: value for key, value in defaults.items() if key not in settings}
