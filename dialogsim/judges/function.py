"""A plain judging function ``(pairs) -> list[float]`` of the user's, as a pairwise judge."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence

from dialogsim.judges.base import ENDED_BEFORE_TURN, Judgement, JudgePair

logger = logging.getLogger(__name__)

JudgingFunction = Callable[[list[JudgePair]], Sequence[float]]


class FunctionJudge:
    """Judges pairs with ``function`` (implements :class:`~dialogsim.judges.base.PairwiseJudge`).

    ``function`` gets the pairs whose dialogues both reach turn h (read them with :meth:`JudgePair.truncated`)
    and returns P(first is better) in [0, 1] for each. A failure never becomes a verdict: NaN with the reason
    ``"ended_before_turn"`` (not passed to ``function``), ``"function_error:<exception type>"`` (the call raised;
    logged once per type), ``"function_wrong_length"`` or ``"function_not_a_probability"``.

    Args:
        function: called once per :meth:`judge` call with every judgeable pair.
        name: the judge's label, used for its output folder (e.g. ``"plugin-my_judges_length"``).
    """

    def __init__(self, function: JudgingFunction, name: str) -> None:
        self.function = function
        self.name = name
        self._logged: set[str] = set()

    def judge(self, pairs: Sequence[JudgePair]) -> list[Judgement]:
        """One judgement per pair (see the class docstring)."""
        reaches = [pair.truncated() is not None for pair in pairs]
        judged = [pair for pair, reached in zip(pairs, reaches, strict=True) if reached]
        values: list[object] = []
        reason = None
        try:
            values = list(self.function(judged)) if judged else []
        except Exception as error:  # the user's code: a failure is a NaN with its reason, never a crash or a guess
            reason = f"function_error:{type(error).__name__}"
            if reason not in self._logged:
                self._logged.add(reason)
                logger.warning("judge %s raised %s: %s (judged NaN)", self.name, type(error).__name__, error)
        if reason is None and len(values) != len(judged):
            reason = "function_wrong_length"
        verdicts = iter([Judgement(math.nan, reason)] * len(judged) if reason else [_judgement(v) for v in values])
        return [next(verdicts) if reached else Judgement(math.nan, ENDED_BEFORE_TURN) for reached in reaches]


def _judgement(value: object) -> Judgement:
    """A probability as a judgement; anything but a real number in [0, 1] is NaN."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0:
        return Judgement(float(value))
    return Judgement(math.nan, "function_not_a_probability")
