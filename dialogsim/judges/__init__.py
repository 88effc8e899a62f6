"""Pairwise judges: two dialogues of one prompt and a turn h in, P(first is better) out."""

from dialogsim.judges.base import Judgement, JudgePair, PairwiseJudge
from dialogsim.judges.llm_judge import LLMJudge
from dialogsim.judges.reward_judge import RewardModelJudge

__all__ = ["JudgePair", "Judgement", "LLMJudge", "PairwiseJudge", "RewardModelJudge"]
