"""Command lines generated from config dataclasses, with an optional YAML/JSON ``--config`` file.

A config file that cannot be read, parsed (YAML / JSON syntax, named by file:line:column) or applied (unknown keys)
is refused with a :class:`~dialogsim.console.UsageError`; commands print it as one ``error:`` line and exit 2
(:mod:`dialogsim.console`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

from dialogsim.console import EPILOG, UsageError
from dialogsim.settings import union_members

ConfigT = TypeVar("ConfigT")


class SettingsParser(HfArgumentParser):
    """``HfArgumentParser`` for fields declared with :func:`dialogsim.settings.setting`: a flag's help is the field's
    ``help`` (``%`` escaped, as argparse %-formats it); the field's other metadata (``valid``, ``shapes``) is not
    passed on to ``add_argument`` (``HfArgumentParser`` passes every metadata key)."""

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field[Any]) -> None:
        flag = copy.copy(field)  # HfArgumentParser rewrites the type of an Optional field in place
        flag.metadata = types.MappingProxyType({"help": field.metadata["help"].replace("%", "%%")})
        HfArgumentParser._parse_dataclass_field(parser, flag)


def parse_config(config_class: type[ConfigT], argv: Sequence[str] | None, description: str) -> ConfigT:
    """Parse ``argv`` into ``config_class``; ``--config FILE`` (YAML or JSON) sets defaults that flags override.

    Raises:
        SystemExit: bad flags (argparse's message names them; exit 2).
        UsageError: the config file is missing, not YAML / JSON (file:line:column), not a mapping, or has unknown
            keys; a value is invalid (:func:`dialogsim.settings.check_settings`, from the config's ``__post_init__``).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, rest = pre.parse_known_args(argv)
    parser = SettingsParser(config_class, description=description, epilog=EPILOG)
    for action in parser._actions:  # Literal choices are checked with the config (ValueError naming the field)
        action.choices = None
    parser.add_argument("--config", type=Path, help="YAML or JSON file of defaults; flags override it")
    if known.config is not None:
        flags = {action.dest for action in parser._actions}
        parser.set_defaults(**_read_config_file(known.config, flags, config_class))
    config, *_, remaining = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)} (see --help for the flags)")
    return config


def _read_config_file(path: Path, known: set[str], config_class: type) -> dict[str, Any]:
    """The file's field: value mapping, with YAML's scalars read as the flags would read them.

    A bare string for a list field is a one-item list (``tasks: Math_CoT`` is ``[Math_CoT]``, not its
    letters) and a number for a float field is a float, also where YAML 1.1 reads a string (``1e-6``).
    Other types are checked when the config is built (:func:`dialogsim.settings.check_settings`).

    Args:
        known: the parser's destinations (``--help``'s flags without dashes).

    Raises:
        UsageError: the file is missing, unreadable, not valid YAML / JSON (naming file:line:column and the
            problem), not a mapping, or holds keys that are not flags.
    """
    if not path.is_file():
        raise UsageError(f"--config {path}: file not found; give a YAML or JSON file of field: value")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path}: cannot be read ({error}); give a UTF-8 YAML or JSON file") from None
    values = _parse_config_text(path, text)
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown keys {unknown}; valid keys are the flags of --help")
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


def _parse_config_text(path: Path, text: str) -> Any:
    """``text`` parsed as JSON (a ``.json`` file) or YAML.

    Raises:
        UsageError: a syntax error, as ``<path>:<line>:<column>: <problem> (<context>)``, 1-based as editors count.
    """
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}:{error.lineno}:{error.colno}: {error.msg}; fix the JSON syntax there") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = f" ({error.context})" if error.context else ""
        raise UsageError(f"{where}: {error.problem}{context}; fix the YAML syntax there") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({error})") from None
