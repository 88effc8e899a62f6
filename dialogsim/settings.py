"""Settings declared once, on the field: default, valid range, help line and what the value shapes.

Every field of a settings dataclass (the simulator's :class:`~dialogsim.data.PromptConfig`,
:class:`~dialogsim.simulator.EpisodeConfig`, :class:`~dialogsim.sampling.SamplingParams`, ``envs.config``'s
groups, ``refuel.config``'s groups) is declared with :func:`setting`, which writes into the field's metadata:

- ``help``: the one-line help (``--help`` of the commands, generated from it; the adapters' descriptions);
- ``valid``: the :class:`Range` of a numeric field (finite, > 0, 1..5, …); :func:`check_settings` checks it;
- ``shapes``: which product of a run depends on the value (:data:`SHAPES`), from which each fingerprint is
  derived: a run stage's record (``refuel.run_folder``) and an evaluation's dialogue cache key. ``None``: no
  result depends on it (a folder, a checkpoint frequency, engine memory), so it may change between reruns.

A field that means the same thing in another class is declared once and taken over with :func:`same_as`
(its default, range, help and ``shapes`` come along). A class checks itself by calling :func:`check_settings`
in ``__post_init__`` (with the :class:`Rule` s that combine its fields, each written once, next to the class that
has the fields), so values given by keyword (``gym.make`` kwargs, a YAML file, a flag) are all checked.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cache
from typing import Any, Literal, get_args

from dialogsim.console import UsageError

Shapes = Literal["dialogues", "pairs", "training"]
"""What a value shapes: ``dialogues`` (every generated dialogue: prompts, user, engines, sampling, seed, horizon),
``pairs`` (collected REFUEL pairs beyond their dialogues: rewards, reset points, counts), ``training`` (the trained
policy: loss, optimizer, batching). A run's collection stage depends on ``dialogues`` and ``pairs`` fields, its
training stage on all three, an evaluation's dialogues on ``dialogues`` fields."""
SHAPES: tuple[str, ...] = get_args(Shapes)
STRING = "a string (in YAML, quote words such as no / yes / off)"


@dataclass(frozen=True)
class Range:
    """Valid values of a numeric field: finite, between ``low`` and ``high`` (``None``: unbounded).

    ``low_open`` / ``high_open`` exclude the bound itself.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '≥'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '≤'} {self.high:g}")
        return " and ".join(parts) if parts else "any finite value"


MAX_HORIZON = 5  # H ≤ 5 turns, as in the paper's dialogues (arXiv 2410.04612)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
SHARE = Range(0, 1)  # [0, 1]
HORIZON = Range(1, MAX_HORIZON)


def setting(
    default: Any = MISSING,
    *,
    default_factory: Any = MISSING,
    help: str,
    shapes: Shapes | None,
    valid: Range | None = None,
) -> Any:
    """A dataclass field declared once: ``default`` (or ``default_factory``), ``help``, ``shapes``, ``valid``.

    Args:
        help: one line: what the value is, its unit, the paper's symbol or value.
        shapes: which product depends on the value (:data:`Shapes`), or ``None``; it decides the fingerprints.
        valid: the range of a numeric field (every ``int`` / ``float`` field has one).

    Returns:
        ``dataclasses.field(...)`` with ``metadata={"help", "shapes", "valid"}``.
    """
    metadata = {"help": help, "shapes": shapes, "valid": valid}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def same_as(config: type, name: str) -> Any:
    """The field ``name`` of the settings dataclass ``config`` for another class: the same default, range, help
    and ``shapes``, declared once (in ``config``).

    Raises:
        KeyError: ``config`` has no field ``name``.
    """
    spec = declared(config, name)
    return field(default=spec.default, default_factory=spec.default_factory, metadata=spec.metadata)


def declared(config: type, name: str) -> Field[Any]:
    """The ``dataclasses.Field`` of ``config``'s field ``name`` (its default and metadata).

    Raises:
        KeyError: ``config`` has no field ``name``.
    """
    found = {spec.name: spec for spec in fields(config)}
    if name not in found:
        raise KeyError(f"{config.__name__} has no field {name!r}")
    return found[name]


def default_of(spec: Field[Any]) -> Any:
    """The default value of the field ``spec`` (a fresh one for a ``default_factory``)."""
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default


def field_names(*groups: type, shapes: tuple[str | None, ...] | None = None) -> tuple[str, ...]:
    """The field names of the dataclasses ``groups``, in order (each name once); with ``shapes``, only the fields
    whose ``shapes`` is one of them."""
    return tuple(
        dict.fromkeys(
            spec.name
            for group in groups
            for spec in fields(group)
            if shapes is None or spec.metadata.get("shapes") in shapes
        )
    )


def union_members(annotation: Any) -> tuple[Any, ...]:
    """The members of a ``X | Y`` annotation (``(list[str], NoneType)``), or ``(annotation,)`` for any other."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    return typing.get_args(annotation) if union else (annotation,)


def _expected(annotation: Any) -> tuple[tuple[Any, ...] | None, str]:
    """The Python types that fit ``annotation`` (int, float, bool, str, list[str], or one of them | None)
    and how to say so; ``bool`` is kept apart from ``int``, NumPy integers are integers. For a ``Literal``, the
    first item is ``None`` (the allowed values are its arguments)."""
    if typing.get_origin(annotation) is list:
        return (list,), "a list of strings"
    if typing.get_origin(annotation) is typing.Literal:
        return None, f"{STRING}: one of {', '.join(map(str, typing.get_args(annotation)))}"
    return {
        int: ((numbers.Integral,), "an integer"),
        float: ((numbers.Real,), "a finite number"),
        bool: ((bool,), "true or false"),
        str: ((str,), STRING),
    }.get(annotation, ((object,), "any value"))


def _fits(value: Any, annotation: Any) -> tuple[bool, str]:
    """Whether ``value`` fits ``annotation``, and the description of what fits."""
    options = union_members(annotation)
    (annotation,) = [option for option in options if option is not type(None)]
    allowed, kind = _expected(annotation)
    if value is None:
        return type(None) in options, kind
    if allowed is None:
        return value in typing.get_args(annotation) and isinstance(value, str), kind
    ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
    if ok and list in allowed:
        ok = all(isinstance(item, str) for item in value)
    return ok, kind


@cache
def _type_hints(config_type: type) -> dict[str, Any]:
    return typing.get_type_hints(config_type)


def _field_problems(config: Any) -> list[str]:
    """Each field of the dataclass ``config`` whose value does not fit its annotation (an integer field refuses
    4.5, a list field a bare string, a ``Literal`` field a value outside its choices) or its ``valid`` range, as
    ``name=value (valid: what is)``, e.g. ``eta=inf (valid: a finite number > 0)``."""
    hints = _type_hints(type(config))
    problems = []
    for spec in fields(config):
        value = getattr(config, spec.name)
        fits, kind = _fits(value, hints[spec.name])
        valid = spec.metadata.get("valid")
        if fits and (valid is None or value is None or value in valid):
            continue
        problems.append(f"{spec.name}={value!r} (valid: {kind}{f' {valid}' if valid else ''})")
    return problems


@dataclass(frozen=True)
class Rule:
    """A combination of fields that must hold: checked when the config has every one of ``fields``.

    ``holds(config)`` says whether it does; the error names ``fields[0]`` with its value and ``valid``.
    """

    fields: tuple[str, ...]
    holds: Callable[[Any], bool]
    valid: str


def check_settings(config: Any, rules: Sequence[Rule] = ()) -> None:
    """Check every field of the dataclass ``config`` against its annotation and its ``valid`` range, then (once
    every field is valid on its own) each of ``rules`` whose fields ``config`` has.

    Raises:
        UsageError: (a ``ValueError``) ``invalid <class> values: ...`` naming each bad field, its value and what
            is valid (:func:`_field_problems`; for a rule, its first field and ``valid``), e.g.
            ``eta=inf (valid: a finite number > 0)``, ``pairs_per_iteration=4.5 (valid: an integer ≥ 2)``.
    """
    problems = _field_problems(config)
    if not problems:
        names = {spec.name for spec in fields(config)}
        for rule in rules:
            if set(rule.fields) <= names and not rule.holds(config):
                problems.append(f"{rule.fields[0]}={getattr(config, rule.fields[0])!r} (valid: {rule.valid})")
    if problems:
        raise UsageError(f"invalid {type(config).__name__} values: {', '.join(problems)}")
