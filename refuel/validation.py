"""One check of a run's settings, shared by ``refuel-train``, ``refuel-plan`` and ``refuel-evaluate``.

:func:`check_fields` runs when a config dataclass is built (``__post_init__``), that is at parse time,
before anything loads. It checks every field's type against its annotation (an integer field refuses
4.5, a list field refuses a bare string) and every numeric field named in :data:`FIELD_RANGES` against its
range (finite, > 0, 1..5, …). A field name means the same thing in every config, so one table serves all.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any


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
HORIZON = Range(1, 5)  # DESIGN.md §2: H ≤ 5 turns, as in the paper

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


def _type_problem(value: Any, annotation: Any) -> str | None:
    """Why ``value`` does not fit ``annotation`` (int, float, bool, str, list[str], or one of them | None)."""
    if isinstance(annotation, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (annotation,) = [option for option in options if option is not type(None)]
    if typing.get_origin(annotation) is list:
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        return None if ok else "a list of strings"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is str:
        return None if isinstance(value, str) else "a string (in YAML, quote words such as no / yes / off)"
    return None


def check_fields(config: Any) -> None:
    """Check every field of the dataclass ``config``: its type, and its range if :data:`FIELD_RANGES` names it.

    Raises:
        ValueError: names each bad field, its value and what is valid, e.g.
            ``eta=inf (valid: a finite number > 0)``, ``pairs_per_iteration=4.5 (valid: an integer ≥ 2)``.
    """
    hints = typing.get_type_hints(type(config))
    problems = []
    for spec in fields(config):
        value = getattr(config, spec.name)
        expected = _type_problem(value, hints[spec.name])
        valid = FIELD_RANGES.get(spec.name)
        if expected is None and (valid is None or value is None or value in valid):
            continue
        kind = expected or ("an integer" if isinstance(value, int) else "a finite number")
        problems.append(f"{spec.name}={value!r} (valid: {kind}{f' {valid}' if valid else ''})")
    if problems:
        raise ValueError(f"invalid {type(config).__name__} values: {', '.join(problems)}")
