"""A plain scoring function ``(dialogues, rows) -> list[float]`` of the user's, as a reward model."""

from __future__ import annotations

import logging
import math
import numbers
from collections import Counter
from collections.abc import Callable, Sequence

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch

logger = logging.getLogger(__name__)

ScoringFunction = Callable[[list[list[Message]], list[PromptRow]], Sequence[float]]


class FunctionReward:
    """Scores dialogues with ``function`` (implements :class:`~dialogsim.rewards.base.RewardModel`), as TRL's
    ``reward_funcs`` take callables.

    A failure never becomes a score, as in the project's own rewards: NaN, with the reason counted in
    :attr:`failures`:

    - ``"function_error:<exception type>"`` for every dialogue of a call that raised (logged once per type);
    - ``"function_wrong_length"`` for every dialogue of a call that returned another number of scores;
    - ``"function_not_a_number"`` for a score that is not a finite real number (None, a string, inf, NaN).

    Args:
        function: called once per :meth:`score` call with the whole batch.
        name: for messages, e.g. the ``--reward`` spec.
    """

    def __init__(self, function: ScoringFunction, name: str) -> None:
        self.function = function
        self.name = name
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per dialogue (see the class docstring for NaN).

        Raises:
            ValueError: ``dialogues`` and ``rows`` differ in length.
        """
        check_batch(dialogues, rows, self.name)
        try:
            scores = list(self.function(dialogues, rows))
        except Exception as error:  # the user's code: any failure is a NaN with its reason, never a crash or a 0
            reason = f"function_error:{type(error).__name__}"
            if not self.failures[reason]:
                logger.warning("reward %s raised %s: %s (scored NaN)", self.name, type(error).__name__, error)
            self.failures[reason] += len(dialogues)
            return [math.nan] * len(dialogues)
        if len(scores) != len(dialogues):
            self.failures["function_wrong_length"] += len(dialogues)
            return [math.nan] * len(dialogues)
        return [self._number(score) for score in scores]

    def _number(self, score: object) -> float:
        value = float(score) if isinstance(score, numbers.Real) and not isinstance(score, bool) else math.nan
        if not math.isfinite(value):
            self.failures["function_not_a_number"] += 1
            return math.nan
        return value
