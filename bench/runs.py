"""Fresh-process benchmark runs: one configuration per subprocess, results as JSON, medians per configuration;
and the header every benchmark prints first (the machine and the dtypes its numbers come from).

A benchmark script re-executes itself with ``--worker`` and the configuration's flags; the worker prints
one line ``RESULT <json>``. Running each configuration in a fresh process gives it a clean allocator and
its own peak-RSS high-water mark; interleaving the configurations over the runs spreads any change of
machine load over all of them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from dialogsim.precision import Hardware, engine_dtype


def machine_header(title: str, dtypes: Mapping[str, str]) -> str:
    """The lines a benchmark prints before its tables: the CPU model, the precision-relevant flags (avx2,
    avx512f, avx512_bf16, amx ...), the cores it may use, torch's version and the dtype of each part measured.

    Args:
        title: the benchmark's name.
        dtypes: part → dtype setting (e.g. ``{"engines": "auto", "training": "float32"}``); an ``engine_dtype``
            setting is shown with the dtype it resolves to here.
    """
    shown = []
    for part, setting in dtypes.items():
        resolved = engine_dtype(setting).dtype if setting == "auto" else setting
        shown.append(f"{part} {setting}" + (f" (= {resolved} here)" if resolved != setting else ""))
    return (
        f"# {title}\n"
        f"# machine: {Hardware.detect().summary()}\n"
        f"# cores: {len(os.sched_getaffinity(0))} usable of {os.cpu_count()}; torch {torch.__version__}\n"
        f"# dtypes: {', '.join(shown) or 'no model'}"
    )


def run_worker(command: list[str], env: Mapping[str, str], label: str) -> dict[str, Any]:
    """Run one worker process and return the measurements of its last ``RESULT`` line.

    Raises:
        SystemExit: the worker failed or printed no result (with the tail of its stderr).
    """
    process = subprocess.run(command, env=dict(env), capture_output=True, text=True, check=False)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        sys.exit(f"worker {label} failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def grouped_medians(
    results: Iterable[dict[str, Any]], keys: tuple[str, ...]
) -> tuple[dict[tuple[Any, ...], list[dict[str, Any]]], Callable[[tuple[Any, ...], str], float]]:
    """Runs grouped by the values of ``keys`` (in first-seen order) and a ``median(group, field)`` over a group."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(tuple(result[key] for key in keys), []).append(result)

    def median(group: tuple[Any, ...], field: str) -> float:
        return statistics.median(run[field] for run in groups[group])

    return groups, median
