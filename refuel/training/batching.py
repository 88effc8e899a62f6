"""An iteration's optimizer steps: held-out pairs, step and warm-up counts, and the per-epoch order of step groups.

The micro-batches themselves are fixed once per iteration, in step groups of one optimizer step each
(:func:`refuel.training.layout.plan_micro_batches`). Each epoch visits the step groups in a new seeded order,
the micro-batches of a group consecutively, so ``accelerate`` (which deals micro-batches p, p + P, … to
process p) gives the P processes the micro-batches of one group per step: P processes × b pairs step with
the same pairs as one process × P·b pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from refuel.config import TrainingConfig


def validation_count(pairs: int, fraction: float) -> int:
    """Pairs of an iteration held out for validation: ``round(fraction × pairs)``, none when ``pairs`` ≤ 2."""
    return round(fraction * pairs) if pairs > 2 else 0


@dataclass(frozen=True)
class StepSchedule:
    """An iteration's optimizer steps, for the trainer and for ``refuel-plan`` alike.

    Attributes:
        micro_batches_per_process: ``ceil(micro-batches / P)``: accelerate's default ``even_batches``
            sharding deals every process that many (repeating the first ones to fill the last round).
        steps: optimizer steps: ``epochs × ceil(micro_batches_per_process / accumulation)``.
        warmup: linear warm-up steps before the cosine decay: ``floor(warmup_ratio × steps)``; the floor keeps
            short iterations from spending their first step at learning rate 0 (transformers' warm-up
            starts from 0).
    """

    micro_batches_per_process: int
    steps: int
    warmup: int


def step_schedule(
    micro_batches: int, processes: int, accumulation: int, epochs: int, warmup_ratio: float
) -> StepSchedule:
    """The :class:`StepSchedule` of ``micro_batches`` micro-batches (per epoch) on ``processes`` processes."""
    per_process = math.ceil(micro_batches / processes)
    steps = epochs * math.ceil(per_process / accumulation)
    return StepSchedule(per_process, steps, int(warmup_ratio * steps))


def effective_batch_mismatch(config: TrainingConfig, processes: int) -> str | None:
    """The rule ``per_device_batch_size × gradient_accumulation_steps × processes = effective_batch_size``, for
    ``refuel-plan`` (the launch's predicted process count) and the trainer (accelerate's) alike.

    Returns:
        ``None`` when the product matches or ``effective_batch_size`` is unset; else the message saying which
        fields disagree and how to fix them.
    """
    effective = config.per_device_batch_size * config.gradient_accumulation_steps * processes
    if config.effective_batch_size is None or effective == config.effective_batch_size:
        return None
    return (
        f"{config.per_device_batch_size} pairs per device × {config.gradient_accumulation_steps} accumulation × "
        f"{processes} processes = {effective} pairs per step, but effective_batch_size is "
        f"{config.effective_batch_size}; launch with the intended number of processes or change "
        "per_device_batch_size / gradient_accumulation_steps / effective_batch_size"
    )


class StepGroupSampler(Sampler[int]):
    """Micro-batch indices, step group by step group, the groups in a new seeded order at every pass.

    Args:
        micro_batches: how many micro-batches there are.
        per_group: micro-batches per step group (the last group may hold fewer).
        seed: seed of the ``torch.Generator`` that draws each pass's order of groups; every process
            draws the same orders.
    """

    def __init__(self, micro_batches: int, per_group: int, seed: int) -> None:
        self.micro_batches, self.per_group = micro_batches, per_group
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.micro_batches

    def __iter__(self) -> Iterator[int]:
        groups = -(-self.micro_batches // self.per_group)
        for group in torch.randperm(groups, generator=self.generator).tolist():
            yield from range(group * self.per_group, min((group + 1) * self.per_group, self.micro_batches))
