"""Pack what fine-tuning the embedded guard needs onto a GPU machine that has neither the shared
data nor the packaged encoder, within a 64 MiB carry limit.

    python -m offline.embedded_finetune_pack --data-dir ../shared/data --out .gpu/embedded-ft

writes ``OUT/responses.jsonl.gz`` (the response rows as ``load_responses`` reads them, seeded),
``OUT/encoder/`` (the packaged all-MiniLM-L6-v2 with its weights in fp16: 45 MB instead of 91;
``SentenceEncoder`` loads it back as float32) and, with ``--wheels``, ``OUT/wheels/`` (pydantic
and its parts for CPython 3.12 on x86-64, which the guard's package imports and a bare PyTorch
image may lack). ``offline/gpu/embedded_finetune_loso.sh`` runs the fine-tuned
leave-one-source-out table from it.

The fp16 copy rounds the frozen weights (relative error below 1e-3): figures measured with it
are the recipe's, not bit-for-bit the shipped model's, which loads the fp32 package.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from offline.embedded_data import load_responses, write_records

ENCODER_FILES = ("config.json", "modules.json", "sentence_bert_config.json",
                 "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                 "vocab.txt", "config_sentence_transformers.json", "1_Pooling/config.json")
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")


def pack_encoder(source: Path, target: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for name in ENCODER_FILES:
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
    tensors = load_file(str(source / "model.safetensors"))
    save_file({name: tensor.to(torch.float16) if tensor.is_floating_point() else tensor
               for name, tensor in tensors.items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    return target


def download_wheels(target: Path) -> None:
    """The versions installed here, as binary wheels for the GPU image's Python (3.12)."""
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                 "manylinux2014_x86_64") for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms,
                    "-d", str(target), *pins], check=True)


def main(argv: Sequence[str] | None = None) -> Path:
    from guardrail.guards.embedded.encoder import default_encoder_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", default=".gpu/embedded-ft")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wheels", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_responses(Path(args.data_dir), args.seed)
    write_records(rows, out / "responses.jsonl.gz")
    pack_encoder(default_encoder_path(), out / "encoder")
    if args.wheels:
        download_wheels(out / "wheels")
    size = sum(file.stat().st_size for file in out.rglob("*") if file.is_file())
    print(f"{len(rows)} response rows, the encoder in fp16"
          f"{', wheels' if args.wheels else ''}: {size / 2**20:.1f} MiB in {out}")
    return out


if __name__ == "__main__":
    main()
