"""Resumable training state: ``accelerate`` checkpoints written atomically, with the data position.

A checkpoint folder ``checkpoint-<step>`` holds ``accelerate``'s ``save_state`` output (weights,
optimizer, scheduler, every process's RNG states) and ``position.json`` (epoch, micro-batch index,
``accelerate``'s accumulation counter, the step log). It is written under a temporary name and
renamed when complete, so a crash leaves either a whole checkpoint or none; older checkpoints are
removed after the rename.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

POSITION = "position.json"
PREFIX = "checkpoint-"


def save_training_state(accelerator: Accelerator, folder: Path, step: int, position: dict[str, Any]) -> Path:
    """Write ``checkpoint-<step>`` under ``folder`` atomically; collective (every process calls it).

    Returns:
        The checkpoint's folder.
    """
    final = folder / f"{PREFIX}{step}"
    staging = folder / f".{PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        (staging / POSITION).write_text(json.dumps(position))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for older in folder.glob(f"{PREFIX}*"):
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_training_state(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint under ``folder`` and its position, or ``None``."""
    complete = [path for path in folder.glob(f"{PREFIX}*") if (path / POSITION).exists()]
    if not complete:
        return None
    latest = max(complete, key=lambda path: int(path.name.removeprefix(PREFIX)))
    return latest, json.loads((latest / POSITION).read_text())
