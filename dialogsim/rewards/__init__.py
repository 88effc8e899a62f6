"""Reward models and judges that score complete dialogues."""

from dialogsim.rewards.base import RewardModel

__all__ = ["RewardModel"]
