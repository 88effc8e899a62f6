"""The reward-model contract: complete dialogues in, one float each out, NaN on failure."""

from __future__ import annotations

from collections import Counter
from typing import Protocol, runtime_checkable

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow


@runtime_checkable
class RewardModel(Protocol):
    """Scores complete dialogues (the last assistant turn in the context of the ones before).

    Attributes:
        failures: counts of reasons for which a score was NaN (e.g. ``"no_reference"``).
    """

    failures: Counter[str]

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per dialogue; ``rows[i]`` is the prompt row that started ``dialogues[i]``.

        A dialogue that cannot be scored gets ``float("nan")`` and its reason is counted in
        :attr:`failures`; the call never silently returns 0 for a failure.
        """
        ...


def check_batch(dialogues: list[list[Message]], rows: list[PromptRow], scorer: str) -> None:
    """Raise ``ValueError`` unless there is exactly one prompt row per dialogue."""
    if len(dialogues) != len(rows):
        raise ValueError(f"{scorer}.score: {len(dialogues)} dialogues but {len(rows)} rows; pass one row per dialogue")
