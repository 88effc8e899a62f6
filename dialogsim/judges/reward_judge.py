"""The reward-model judge: the dialogue whose truncation at turn h scores higher wins; equal scores tie."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from dialogsim.judges.base import ENDED_BEFORE_TURN, Judgement, JudgePair
from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import RewardModel

REWARD_NAN = "reward_nan"


def pairwise_outcome(first_score: float, second_score: float, tie_tolerance: float = 0.0) -> float:
    """P(first is better) from two scalar scores of the same scale (higher is better).

    Args:
        first_score / second_score: the two dialogues' scores, any scale.
        tie_tolerance: scores whose absolute difference is at most this tie (same units as the scores).

    Returns:
        1.0 if the first scores higher, 0.0 if lower, 0.5 for a tie, NaN if either score is NaN.

    Raises:
        ValueError: ``tie_tolerance`` is negative.
    """
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    if math.isnan(first_score) or math.isnan(second_score):
        return math.nan
    difference = first_score - second_score
    if abs(difference) <= tie_tolerance:
        return 0.5
    return 1.0 if difference > 0 else 0.0


class RewardModelJudge:
    """Pairwise judge from a reward model (implements :class:`~dialogsim.judges.base.PairwiseJudge`).

    Each dialogue truncated at turn h is scored by ``reward.score`` in context of its prompt row; the
    judgement is :func:`pairwise_outcome` of the two scores, ``details`` holds ``score_first`` and
    ``score_second``. Scores are independent of the order the dialogues are given in, so this judge has no
    position bias. One reward call serves all pairs, and a truncated dialogue that occurs in several pairs
    (the baseline's, compared with several candidates) is scored once.

    NaN reasons: ``"ended_before_turn"`` (either dialogue has no reply at turn h), ``"reward_nan"`` (the
    reward model gave NaN; its own reasons are counted in ``reward.failures``).

    Args:
        reward: any :class:`~dialogsim.rewards.base.RewardModel`.
        name: label of the judge, e.g. ``"reward-math"``.
        tie_tolerance: see :func:`pairwise_outcome`.
    """

    def __init__(self, reward: RewardModel, name: str = "reward", tie_tolerance: float = 0.0) -> None:
        pairwise_outcome(0.0, 0.0, tie_tolerance)  # validates the tolerance early
        self.reward = reward
        self.name = name
        self.tie_tolerance = tie_tolerance

    def judge(self, pairs: Sequence[JudgePair]) -> list[Judgement]:
        """One judgement per pair (see the class docstring)."""
        truncations = [pair.truncated() for pair in pairs]
        unique: dict[str, tuple[list[Message], PromptRow]] = {}
        for pair, dialogues in zip(pairs, truncations, strict=True):
            for dialogue in dialogues or ():
                unique.setdefault(_key(dialogue, pair.row), (dialogue, pair.row))
        scores = self.reward.score([d for d, _ in unique.values()], [row for _, row in unique.values()])
        score_of = dict(zip(unique, scores, strict=True))
        judgements = []
        for pair, dialogues in zip(pairs, truncations, strict=True):
            if dialogues is None:
                judgements.append(Judgement(math.nan, ENDED_BEFORE_TURN))
                continue
            first, second = (float(score_of[_key(dialogue, pair.row)]) for dialogue in dialogues)
            outcome = pairwise_outcome(first, second, self.tie_tolerance)
            details = {"score_first": first, "score_second": second}
            judgements.append(Judgement(outcome, REWARD_NAN if math.isnan(outcome) else None, details))
        return judgements


def _key(dialogue: list[Message], row: PromptRow) -> str:
    return json.dumps([row.id, dialogue])
