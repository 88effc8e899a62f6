"""Rows on disk as JSON Lines through ``datasets``, written atomically (temporary file, then rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` to ``path`` (JSON Lines) so that the file is complete or absent, never partial.

    Raises:
        ValueError: ``rows`` is empty (an empty file would hide a failed stage).
    """
    if not rows:
        raise ValueError(f"refusing to write an empty file {path}; the stage produced no rows")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        Dataset.from_list(rows).to_json(staging, lines=True, force_ascii=False)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file written by :func:`write_rows`."""
    return load_dataset("json", data_files=str(path), split="train").to_list()


def write_json(value: Any, path: Path) -> Path:
    """Write one JSON document atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        json.dump(value, file, indent=2, default=str)
    os.replace(staging, path)
    return path
