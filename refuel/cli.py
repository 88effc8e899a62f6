"""Command lines generated from config dataclasses, with an optional YAML/JSON ``--config`` file."""

from __future__ import annotations

import argparse
import contextlib
import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

from refuel.validation import union_members

ConfigT = TypeVar("ConfigT")


def parse_config(config_class: type[ConfigT], argv: Sequence[str] | None, description: str) -> ConfigT:
    """Parse ``argv`` into ``config_class``; ``--config FILE`` (YAML or JSON) sets defaults that flags override.

    Raises:
        SystemExit: unknown keys in the config file or bad flags (argparse's message names them).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(config_class, description=description)
    for action in parser._actions:  # Literal choices are checked with the config (ValueError naming the field)
        action.choices = None
    parser.add_argument("--config", type=Path, help="YAML or JSON file of defaults; flags override it")
    if known.config is not None:
        parser.set_defaults(**_read_config_file(known.config, parser, config_class))
    config, *_, remaining = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)} (see --help for the flags)")
    return config


def _read_config_file(path: Path, parser: HfArgumentParser, config_class: type) -> dict[str, Any]:
    """The file's field: value mapping, with YAML's scalars read as the flags would read them.

    A bare string for a list field is a one-item list (``tasks: Math_CoT`` is ``[Math_CoT]``, not its
    letters) and a number for a float field is a float, also where YAML 1.1 reads a string (``1e-6``).
    Other types are checked when the config is built (:func:`refuel.validation.check_config`).
    """
    if not path.exists():
        parser.error(f"--config {path}: file not found")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path}: unknown keys {unknown}; valid keys are the flags of --help")
    hints = typing.get_type_hints(config_class)
    for name, value in values.items():
        if name not in hints:
            continue
        kinds = {typing.get_origin(option) or option for option in union_members(hints[name])}
        if isinstance(value, str) and list in kinds:
            values[name] = [value]
        elif isinstance(value, str | int) and not isinstance(value, bool) and float in kinds:
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values
