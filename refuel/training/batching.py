"""Fixed micro-batches of pairs for one iteration, grouped by length, in a seeded per-epoch order of steps.

π_t's log-probs and the trained policy's log-probs must come from identical computations, or the
relative log-ratio is not 0 before the first step: in bf16 a pair's log-prob changes by up to 0.3 nats
with the padding and company of its micro-batch (README "Training path"). So the micro-batches are
formed once per iteration and never re-formed: π_t's log-probs are computed on them, validation runs
on them, and each epoch trains on them in a new order.

- **Step groups.** The pairs, in a seeded random order (then stably sorted by length when
  ``by_length``), are cut into groups of ``effective batch`` pairs (per device × accumulation ×
  processes), one optimizer step each, and every group into micro-batches of ``per_device`` pairs. Sorting
  puts pairs of similar length in one micro-batch, which cuts padding.
- **Order.** Each epoch visits the step groups in a new seeded order, the micro-batches of a group
  consecutively, so ``accelerate`` (which deals micro-batches p, p + P, … to process p) gives the P
  processes the micro-batches of one group per step: P processes × b pairs step with the same pairs as
  one process × P·b pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


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


def pair_length(row: dict[str, Any]) -> int:
    """Tokens of s_h and both replies of a tokenised pair (its shared-prefix length; the sort key of grouping)."""
    return len(row["input_ids"]) + sum(row["loss_mask_prime"])


def plan_micro_batches(
    rows: Sequence[dict[str, Any]], per_device: int, group_size: int, seed: int, by_length: bool
) -> list[list[int]]:
    """Row indices of each micro-batch, step group after step group.

    Args:
        rows: tokenised pairs.
        per_device: pairs per micro-batch (the last micro-batch of the last group may be shorter).
        group_size: pairs per optimizer step, a multiple of ``per_device``.
        seed: seed of the random order that ties in length keep.
        by_length: sort pairs by :func:`pair_length` (longest first) before cutting.

    Returns:
        Micro-batches (lists of row indices); group g is micro-batches ``[g·k, (g+1)·k)`` with
        ``k = group_size / per_device`` (the last group may hold fewer).

    Raises:
        ValueError: ``per_device`` < 1 or ``group_size`` not a positive multiple of it.
    """
    if per_device < 1 or group_size < per_device or group_size % per_device:
        raise ValueError(f"group_size {group_size} must be a positive multiple of per_device {per_device}")
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    if by_length:
        order.sort(key=lambda index: -pair_length(rows[index]))
    micro_batches = []
    for start in range(0, len(order), group_size):
        group = order[start : start + group_size]
        micro_batches += [group[i : i + per_device] for i in range(0, len(group), per_device)]
    return micro_batches


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
