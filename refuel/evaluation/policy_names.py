"""Readable policy labels for tables, plots and reports, read from the run's metadata.

A policy trained by ``refuel-train`` lives in ``<run>/iteration_<t>/policy``; its iteration folder holds
``metrics.json`` (``"iteration": t``) and the run folder ``config.json`` (the :class:`~refuel.config.RefuelConfig`:
``method``, ``rollin``, ``policy_model`` = π_0). Iteration t trains π_t into π_{t+1}, so that policy is
labelled ``"<method> π_{t+1}"``: ``REFUEL π_1``, ``REFUEL π_2``, ``REBEL-LT π_1``, ``DPO-LT π_1``, with the
roll-in added when it is not the default (``REFUEL π_1 (roll-in initial)``). A policy that is the π_0
of one of those runs is ``π_0``. Any other policy (a model name, a hub id, a folder without run metadata)
keeps its folder-based name (:func:`method_name`).

>>> policy_labels(["smollm2-135m-instruct", "runs/cpu-main/iteration_0/policy"])  # doctest: +SKIP
{'smollm2-135m-instruct': 'π_0', 'runs/cpu-main/iteration_0/policy': 'REFUEL π_1'}
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dialogsim.models import resolve_model

logger = logging.getLogger(__name__)

METHOD_LABELS = {"refuel": "REFUEL", "rebel_lt": "REBEL-LT", "dpo_lt": "DPO-LT"}  # keys: refuel.config.METHODS
DEFAULT_ROLLIN = "current"


@dataclass(frozen=True)
class PolicyOrigin:
    """Where a trained policy comes from, as its run recorded it.

    Attributes:
        run_dir: the run folder (``refuel-train --output_dir``).
        method: ``refuel``, ``rebel_lt`` or ``dpo_lt`` (``config.json``).
        rollin: where REFUEL pairs started (``config.json``; ``current`` by default).
        iteration: t of the iteration that produced this policy, which is π_{t+1} (``metrics.json``).
        initial_policy: the run's π_0 (``config.json`` ``policy_model``).
    """

    run_dir: Path
    method: str
    rollin: str
    iteration: int
    initial_policy: str

    @property
    def label(self) -> str:
        """``"<method> π_{t+1}"``, plus ``(roll-in <rollin>)`` when the roll-in is not the default."""
        label = f"{METHOD_LABELS.get(self.method, self.method)} π_{self.iteration + 1}"
        return label if self.rollin == DEFAULT_ROLLIN else f"{label} (roll-in {self.rollin})"


def policy_origin(policy: str) -> PolicyOrigin | None:
    """The run metadata of a policy folder ``<run>/<iteration folder>/policy``, or ``None`` if it has none.

    Reads ``<iteration folder>/metrics.json`` and ``<run>/config.json`` (the folder names are not parsed).
    A metadata file that exists but cannot be read is logged at WARNING and treated as absent.
    """
    folder = Path(policy).expanduser()
    metrics_file, config_file = folder.parent / "metrics.json", folder.parent.parent / "config.json"
    if not (folder.is_dir() and metrics_file.is_file() and config_file.is_file()):
        return None
    try:
        metrics, config = json.loads(metrics_file.read_text()), json.loads(config_file.read_text())
        return PolicyOrigin(
            run_dir=config_file.parent,
            method=str(config.get("method", "refuel")),
            rollin=str(config.get("rollin", DEFAULT_ROLLIN)),
            iteration=int(metrics["iteration"]),
            initial_policy=str(config["policy_model"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        logger.warning("%s: run metadata unreadable (%r); labelling it by its folder name", policy, error)
        return None


def method_name(policy: str, parts: int = 1) -> str:
    """Folder-based name: ``runs/x/iteration_0/policy`` → ``iteration_0`` (``parts=2``: ``x/iteration_0``)."""
    path = Path(policy)
    path = path.parent if path.name == "policy" else path
    return "/".join(path.parts[-parts:])


def method_names(policies: list[str]) -> dict[str, str]:
    """A distinct folder-based name per policy, using more path parts until the names differ.

    Raises:
        ValueError: the same policy is listed twice.
    """
    if len(set(policies)) != len(policies):
        raise ValueError(f"each policy may be evaluated once; got duplicates in {policies}")
    longest = max(len(Path(policy).parts) for policy in policies)
    for parts in range(1, longest + 1):
        names = {policy: method_name(policy, parts) for policy in policies}
        if len(set(names.values())) == len(policies):
            return names
    return {policy: policy for policy in policies}


def same_model(first: str, second: str) -> bool:
    """Whether two model names or paths name the same model (equal strings, or the same resolved folder)."""
    if first == second:
        return True
    folders = [Path(resolve_model(name)).expanduser() for name in (first, second)]
    return all(folder.is_dir() for folder in folders) and folders[0].resolve() == folders[1].resolve()


def policy_labels(policies: list[str]) -> dict[str, str]:
    """A distinct, readable label per policy, from the run metadata (see the module docstring).

    Labels that would coincide (e.g. the π_1 of two REFUEL runs) get the folder-based name of
    :func:`method_names` in parentheses: ``REFUEL π_1 (run-a/iteration_0)``.

    Raises:
        ValueError: the same policy is listed twice.
    """
    folder_names = method_names(policies)
    origins = {policy: policy_origin(policy) for policy in policies}
    initial = [origin.initial_policy for origin in origins.values() if origin is not None]
    labels = {}
    for policy, origin in origins.items():
        if origin is not None:
            labels[policy] = origin.label
        elif any(same_model(policy, start) for start in initial):
            labels[policy] = "π_0"
        else:
            labels[policy] = folder_names[policy]
    counts = Counter(labels.values())
    return {
        policy: label if counts[label] == 1 or label == folder_names[policy] else f"{label} ({folder_names[policy]})"
        for policy, label in labels.items()
    }
