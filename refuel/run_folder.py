"""Which settings each stage of a run depends on, and the run folder's record of them.

A run folder (``--output_dir``) is marked by ``run.json``, which records, per iteration and stage, the
settings the stage was started with::

    {"format": "refuel-train run", "stages": {"iteration_0": {"collection": {...}, "training": {...}}}}

- **collection** (``shards/``, ``pairs.jsonl``, ``collection.json``) depends on the fields that shape dialogues or
  pairs (:data:`refuel.config.COLLECTION_FIELDS`, each field's ``shapes``, declared on it) and on π_t, i.e. on the
  earlier iterations' training;
- **training** (``checkpoints/``, ``policy/``, ``metrics.json``) depends on those and the fields that shape
  training (:data:`refuel.config.TRAINING_FIELDS`).

A stage is recorded before it writes anything, so partial stages are covered too. A rerun whose settings
differ from a recorded stage's is refused (:meth:`RunFolder.check`) before anything is written or loaded,
naming the settings and the fix: a new ``--output_dir``, or ``--restart_stage`` to start the first
differing stage over. Settings that shape nothing (``shapes=None``: the run folder, iterations, checkpoint
frequency, gradient checkpointing, engine resources, the user server's URL) may change between reruns.
The shard manifest's fingerprint (:class:`refuel.collection.shards.PairShards`) is derived from the same
:func:`stage_settings`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dialogsim.console import UsageError
from refuel.config import COLLECTION_FIELDS, TRAINING_FIELDS, RefuelConfig
from refuel.storage import write_json

RUN_MARKER = "run.json"
RUN_FORMAT = "refuel-train run"
LEGACY_KEYS = {"output_dir", "policy_model", "pairs_per_iteration"}  # in every run's config.json, in no model's

STAGE_FIELDS = {"collection": COLLECTION_FIELDS, "training": TRAINING_FIELDS}  # keys: refuel.config.STAGES
STAGE_FILES = {
    "collection": ("shards", "pairs.jsonl", "collection.json"),
    "training": ("checkpoints", "policy", "metrics.json"),
}


class RunFolderError(UsageError):
    """``--output_dir`` holds something else than this run: another program's files or other settings."""


def describe_run(folder: Path) -> str:
    """One line on what the run folder ``folder`` holds, for ``refuel-train``'s failure line: per iteration that
    ``run.json`` records or that is on disk, the last stage reached (done, training checkpoint, pairs collected,
    collecting with its batches on disk), and that a rerun resumes.
    """
    if not (folder / RUN_MARKER).exists():
        return f"nothing was written to {folder}"
    recorded = json.loads((folder / RUN_MARKER).read_text()).get("stages", {})
    names = set(recorded) | {path.name for path in folder.glob("iteration_*")}
    states = []
    for iteration in (folder / name for name in sorted(names, key=_iteration_number)):
        if (iteration / "metrics.json").exists():
            states.append(f"{iteration.name} done")
        elif (iteration / "checkpoints").exists():
            states.append(f"{iteration.name} training checkpoint in checkpoints/")
        elif (iteration / "pairs.jsonl").exists():
            states.append(f"{iteration.name} pairs collected, not trained")
        else:
            manifest = iteration / "shards" / "manifest.json"
            batches = len(json.loads(manifest.read_text())["batches"]) if manifest.exists() else 0
            states.append(f"{iteration.name} collecting ({batches} batch(es) in shards/)")
    return f"run folder {folder}: {', '.join(states) or 'no stage started'}; the same command resumes from there"


def stage_settings(config: RefuelConfig, stage: str) -> dict[str, Any]:
    """The values of the fields ``stage`` depends on, as they read back from JSON (lists, not tuples)."""
    return json.loads(json.dumps({name: getattr(config, name) for name in STAGE_FIELDS[stage]}, default=str))


def _iteration_number(name: str) -> int:
    return int(name.removeprefix("iteration_"))


class RunFolder:
    """The run folder ``folder`` and its stage records.

    Args:
        folder: ``--output_dir``; may be missing or empty (a new run).

    Raises:
        RunFolderError: ``folder`` is not empty and is not a run of ``refuel-train`` (no ``run.json``,
            and no ``config.json`` of a run written before ``run.json`` existed), e.g. a model folder.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.stages: dict[str, dict[str, dict[str, Any]]] = {}
        contents = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
        if folder.exists() and not folder.is_dir():
            raise RunFolderError(f"--output_dir {folder} is a file; give a new or empty folder")
        if (folder / RUN_MARKER).exists():
            record = json.loads((folder / RUN_MARKER).read_text())
            if record.get("format") != RUN_FORMAT:
                raise RunFolderError(f"{folder / RUN_MARKER} is not a refuel-train run record; give another folder")
            self.stages = record["stages"]
        elif contents and not self._read_legacy_run():
            shown = ", ".join(contents[:5]) + (", …" if len(contents) > 5 else "")
            raise RunFolderError(
                f"--output_dir {folder} holds files that are not a refuel-train run ({shown}; no {RUN_MARKER}); "
                "nothing was written there. Give a new or empty folder"
            )

    def _read_legacy_run(self) -> bool:
        """Adopt a run written before ``run.json``: its ``config.json`` stands for every stage on disk."""
        try:
            values = json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(values, dict) or not set(values) >= LEGACY_KEYS:
            return False
        for iteration in self.folder.glob("iteration_*"):
            for stage, files in STAGE_FILES.items():
                if any((iteration / name).exists() for name in files):
                    recorded = {name: values[name] for name in STAGE_FIELDS[stage] if name in values}
                    self.stages.setdefault(iteration.name, {})[stage] = recorded
        return True

    def differences(self, config: RefuelConfig) -> list[tuple[str, str, dict[str, tuple[Any, Any]]]]:
        """Recorded stages whose settings differ from ``config``'s: (iteration, stage, field → (recorded, now))."""
        found = []
        for iteration in sorted(self.stages, key=_iteration_number):
            for stage in STAGE_FIELDS:
                recorded = self.stages[iteration].get(stage)
                if recorded is None:
                    continue
                now = stage_settings(config, stage)
                changed = {name: (value, now[name]) for name, value in recorded.items() if now.get(name) != value}
                if changed:
                    found.append((iteration, stage, changed))
        return found

    def check(self, config: RefuelConfig) -> tuple[str, str] | None:
        """Refuse ``config`` if it would change a recorded stage, unless ``config.restart_stage`` covers it.

        Returns:
            ``(iteration, stage)`` to start over from (:meth:`restart`), or ``None`` when nothing differs.

        Raises:
            RunFolderError: a recorded stage differs and ``restart_stage`` is unset, or names a later stage
                than the first one that differs (the message lists the settings and the fix).
        """
        found = self.differences(config)
        if not found:
            return None
        iteration, stage, _ = found[0]
        if config.restart_stage is not None and (
            list(STAGE_FIELDS).index(config.restart_stage) <= list(STAGE_FIELDS).index(stage)
        ):
            return iteration, config.restart_stage
        lines = [
            f"  {name} {stage_name}: "
            + ", ".join(f"{field} {old!r} → {new!r}" for field, (old, new) in changed.items())
            for name, stage_name, changed in found
        ]
        raise RunFolderError(
            f"--output_dir {self.folder} holds stages run with other settings:\n"
            + "\n".join(lines)
            + f"\nReusing them would mix settings. Use a new --output_dir, or --restart_stage {stage} to start "
            f"{iteration}'s {stage} over (its files and every later iteration are removed). Nothing was written."
        )

    def restart(self, iteration: str, stage: str) -> None:
        """Remove ``stage`` and the stages after it in ``iteration``, and every later iteration (main process)."""
        later = list(STAGE_FIELDS)[list(STAGE_FIELDS).index(stage) :]
        for name in list(self.stages):
            if _iteration_number(name) > _iteration_number(iteration):
                shutil.rmtree(self.folder / name, ignore_errors=True)
                del self.stages[name]
        for removed in later:
            for file in STAGE_FILES[removed]:
                path = self.folder / iteration / file
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            self.stages[iteration].pop(removed, None)
        self.save()

    def record(self, iteration: int, stage: str, config: RefuelConfig) -> None:
        """Record that ``stage`` of ``iteration`` runs with ``config``'s settings (before it writes anything)."""
        self.stages.setdefault(f"iteration_{iteration}", {})[stage] = stage_settings(config, stage)
        self.save()

    def save(self) -> None:
        """Write ``run.json`` (atomically); this marks the folder as a run."""
        write_json({"format": RUN_FORMAT, "stages": self.stages}, self.folder / RUN_MARKER)
