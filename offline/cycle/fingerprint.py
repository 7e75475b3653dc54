"""Fingerprints of a stage's inputs: files, folders, case stores and package versions.

A file is hashed by content (SHA-256) up to ``LARGE_FILE_BYTES``; a larger one (model weights)
by its size and modification time, as ``make`` would, so that checking a 15 GB model folder
does not read it on every run. A folder is the hash of its sorted relative paths and their
files' fingerprints. A SQLite case store is hashed by its content as SQL text (``iterdump``):
its file changes when WAL pages are checkpointed, its rows do not. Any other store (PostgreSQL)
cannot be fingerprinted cheaply, so its stage always runs; the stages after it still skip when
what it wrote is the same as before.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import closing
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

LARGE_FILE_BYTES = 64 * 2**20
_BLOCK = 2**20


def digest_of(value: Any) -> str:
    """The SHA-256 of a JSON-able value, keys sorted."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_fingerprint(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > LARGE_FILE_BYTES:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            sha.update(block)
    return sha.hexdigest()


def path_fingerprint(path: Path) -> str:
    """A file's or a folder's fingerprint; a path that does not exist is an error (the stage
    cannot run on it either)."""
    if path.is_file():
        return file_fingerprint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    entries = []
    for item in sorted(path.rglob("*")):
        if item.is_file():
            entries.append([item.relative_to(path).as_posix(), file_fingerprint(item)])
    return digest_of(entries)


def model_fingerprint(name: str) -> str:
    """A local model folder by its files; a hub id by its name (the hub decides what it is)."""
    path = Path(name)
    return path_fingerprint(path) if path.exists() else f"name={name}"


def store_fingerprint(url: str) -> str | None:
    """A SQLite store's rows as SQL text, hashed; None for a store that cannot be hashed."""
    scheme, separator, _ = url.partition("://")
    if not separator or scheme.split("+")[0] != "sqlite":
        return None
    from guardrail.cases.sqlite_store import sqlite_path

    path = Path(sqlite_path(url))
    if not path.exists():
        raise FileNotFoundError(f"{path}: the case store does not exist")
    sha = hashlib.sha256()
    # Read-only: fingerprinting never writes the proxy's store.
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as database:
        for line in database.iterdump():
            sha.update(line.encode("utf-8"))
            sha.update(b"\n")
    return sha.hexdigest()


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
