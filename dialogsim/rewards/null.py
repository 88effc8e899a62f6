"""No reward: for runs that only need dialogues, such as generating evaluation dialogues."""

from __future__ import annotations

from collections import Counter

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch


class NoReward:
    """Every dialogue gets NaN with the reason ``"no_reward"`` (implements ``RewardModel``).

    Use it where a simulator needs a reward model but nothing reads the reward (e.g. ``refuel-evaluate``
    generating dialogues that a judge compares later); a training run with it drops every pair as invalid.
    """

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """NaN per dialogue.

        Raises:
            ValueError: ``dialogues`` and ``rows`` differ in length.
        """
        check_batch(dialogues, rows, "NoReward")
        self.failures["no_reward"] += len(dialogues)
        return [float("nan")] * len(dialogues)
