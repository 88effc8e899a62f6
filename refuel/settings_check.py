"""One check of a command's settings, shared by ``refuel-train``, ``refuel-plan`` and ``refuel-evaluate``.

:func:`check_config` runs when a config dataclass is built (``__post_init__``), that is at parse time,
before anything loads. It checks every field's type against its annotation (an integer field refuses
4.5, a list field refuses a bare string, a ``Literal`` field refuses a value outside its choices), every
numeric field named in :data:`FIELD_RANGES` against its range (finite, > 0, 1..5, …), and every
combination in :data:`RULES` whose fields the config has. A field name means the same thing in every
config, so one table serves all.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from dialogsim.console import UsageError


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


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
SHARE = Range(0, 1)  # [0, 1]
HORIZON = Range(1, 5)  # H ≤ 5 turns, as in the paper's dialogues (arXiv 2410.04612)

FIELD_RANGES: dict[str, Range] = {
    # prompts and episodes
    "holdout": NON_NEGATIVE,
    "n_prompts": AT_LEAST_ONE,
    "iterations": AT_LEAST_ONE,
    "pairs_per_iteration": Range(2),
    "max_horizon": HORIZON,
    "horizon": HORIZON,
    "max_new_tokens": AT_LEAST_ONE,
    "judge_max_new_tokens": AT_LEAST_ONE,
    "temperature": POSITIVE,
    "top_p": Range(0, 1, low_open=True),
    "max_prompt_tokens": AT_LEAST_ONE,
    "max_dialogue_tokens": AT_LEAST_ONE,
    "generation_batch_size": AT_LEAST_ONE,
    "vllm_kv_cache_gib": POSITIVE,
    "vllm_tensor_parallel_size": AT_LEAST_ONE,
    "rollin_beta": SHARE,
    "dataset_weight": SHARE,
    "offline_limit": AT_LEAST_ONE,
    # objective and optimizer
    "eta": POSITIVE,
    "dpo_beta": POSITIVE,
    "learning_rate": POSITIVE,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "warmup_ratio": FRACTION,
    "epochs": AT_LEAST_ONE,
    "checkpoint_every": NON_NEGATIVE,
    "checkpoint_minutes": NON_NEGATIVE,
    "per_device_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE,
    "max_grad_norm": POSITIVE,
    "validation_fraction": FRACTION,
    "lora_r": NON_NEGATIVE,
    "lora_alpha": POSITIVE,
    "lora_dropout": FRACTION,
    "effective_batch_size": AT_LEAST_ONE,
    "seed": NON_NEGATIVE,
}


STRING = "a string (in YAML, quote words such as no / yes / off)"


@dataclass(frozen=True)
class Rule:
    """A combination of fields that must hold: checked when the config has every one of ``fields``.

    ``holds(config)`` says whether it does; the error names ``fields[0]`` with its value and ``valid``.
    """

    fields: tuple[str, ...]
    holds: Callable[[Any], bool]
    valid: str


RULES = (
    Rule(
        ("rollin", "method"),
        lambda c: c.rollin == "current" or c.method == "refuel",
        "current with --method rebel_lt / dpo_lt: the last-turn baselines roll in with π_ref at h = H",
    ),
    Rule(
        ("offline_dialogues", "rollin"),
        lambda c: c.rollin != "dataset" or bool(c.offline_dialogues),
        "a file or hub id of offline dialogues with --rollin dataset",
    ),
    Rule(
        ("user_base_url", "user_backend"),
        lambda c: c.user_backend != "openai" or bool(c.user_base_url),
        "the server's URL with --user_backend openai, e.g. http://127.0.0.1:8000/v1",
    ),
    Rule(("lora_target_modules",), lambda c: bool(c.lora_target_modules), "all-linear, or module names"),
)


def _expected(annotation: Any) -> tuple[tuple[Any, ...] | None, str]:
    """The Python types that fit ``annotation`` (int, float, bool, str, list[str], or one of them | None)
    and how to say so; ``bool`` is kept apart from ``int``. For a ``Literal``, the first item is ``None`` and
    the allowed values come from :func:`literal_choices`."""
    if typing.get_origin(annotation) is list:
        return (list,), "a list of strings"
    if typing.get_origin(annotation) is typing.Literal:
        return None, f"{STRING}: one of {', '.join(map(str, typing.get_args(annotation)))}"
    return {
        int: ((int,), "an integer"),
        float: ((int, float), "a finite number"),
        bool: ((bool,), "true or false"),
        str: ((str,), STRING),
    }.get(annotation, ((object,), "any value"))


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal[...]`` annotation (or of ``Literal[...] | None``), else ``None``."""
    for option in union_members(annotation):
        if typing.get_origin(option) is typing.Literal:
            return typing.get_args(option)
    return None


def union_members(annotation: Any) -> tuple[Any, ...]:
    """The members of a ``X | Y`` annotation (``(list[str], NoneType)``), or ``(annotation,)`` for any other."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    return typing.get_args(annotation) if union else (annotation,)


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


def check_config(config: Any, ranges: Mapping[str, Range] | None = None) -> None:
    """Check every field of the dataclass ``config``: its type, its range if :data:`FIELD_RANGES` names it,
    then the :data:`RULES` whose fields it has (only once every field is valid on its own).

    ``ranges`` replaces :data:`FIELD_RANGES`' entries for this config (e.g. greedy decoding, temperature 0,
    is valid for an evaluation but not for training, whose log-probs are taken at the temperature).

    Raises:
        UsageError: (a ``ValueError``) names each bad field, its value and what is valid, e.g.
            ``eta=inf (valid: a finite number > 0)``, ``pairs_per_iteration=4.5 (valid: an integer ≥ 2)``,
            ``user_base_url=None (valid: the server's URL with --user_backend openai, …)``.
    """
    hints = typing.get_type_hints(type(config))
    problems = []
    for spec in fields(config):
        value = getattr(config, spec.name)
        fits, kind = _fits(value, hints[spec.name])
        valid = (ranges or {}).get(spec.name, FIELD_RANGES.get(spec.name))
        if fits and (valid is None or value is None or value in valid):
            continue
        problems.append(f"{spec.name}={value!r} (valid: {kind}{f' {valid}' if valid else ''})")
    if not problems:
        names = {spec.name for spec in fields(config)}
        for rule in RULES:
            if set(rule.fields) <= names and not rule.holds(config):
                problems.append(f"{rule.fields[0]}={getattr(config, rule.fields[0])!r} (valid: {rule.valid})")
    if problems:
        raise UsageError(f"invalid {type(config).__name__} values: {', '.join(problems)}")
