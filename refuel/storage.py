"""Rows on disk as JSON Lines through ``datasets``, written atomically (temporary file, then rename)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, load_dataset


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``, on failure remove it.

    The file gets the permissions of a plain ``open(..., "w")`` (0666 less the umask, e.g. 0644), not the
    0600 of :func:`tempfile.mkstemp`, so other users can read a run as they could before the rename.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def write_rows(rows: Sequence[Mapping[str, Any]], path: Path, features: Features | None = None) -> Path:
    """Write ``rows`` to ``path`` (JSON Lines) so that the file is complete or absent, never partial.

    Args:
        features: the rows' ``datasets`` schema (e.g. :data:`refuel.pairs.PAIR_FEATURES`); ``None`` infers it.

    Raises:
        ValueError: ``rows`` is empty (an empty file would hide a failed stage), or their keys are not
            the columns of ``features``.
    """
    if not rows:
        raise ValueError(f"refusing to write an empty file {path}; the stage produced no rows")
    if features is not None:
        for index, row in enumerate(rows):
            if row.keys() != features.keys():
                raise ValueError(
                    f"row {index} for {path} has the keys {sorted(row)}, its schema the columns {sorted(features)}"
                )
    with atomic_path(path) as staging:
        Dataset.from_list([dict(row) for row in rows], features=features).to_json(
            staging, lines=True, force_ascii=False
        )
    return path


def read_rows(path: Path, features: Features | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file written by :func:`write_rows`, read with ``features`` (``None`` infers them)."""
    return load_dataset("json", data_files=str(path), split="train", features=features).to_list()


def write_json(value: Any, path: Path) -> Path:
    """Write one JSON document atomically."""
    with atomic_path(path) as staging:
        staging.write_text(json.dumps(value, indent=2, default=str))
    return path
