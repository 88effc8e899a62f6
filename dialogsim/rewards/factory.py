"""Build a reward model from a short command-line spec."""

from __future__ import annotations

from dialogsim.rewards.base import RewardModel
from dialogsim.rewards.embedding import SentenceEmbedder
from dialogsim.rewards.math_reward import MathAnswerReward
from dialogsim.rewards.sequence_classification import SequenceClassificationReward

MATH_SPEC = "math"


def build_reward_model(spec: str, device: str = "cpu", trust_remote_code: bool = False) -> RewardModel:
    """The reward model named by ``spec``.

    Args:
        spec: ``"math"`` (the CPU default: :class:`MathAnswerReward` with the embedded
            all-MiniLM-L6-v2), or a Hugging Face id / local folder of a sequence-classification
            reward model, e.g. ``"Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"``.
        device: torch device for the model(s).
        trust_remote_code: passed to ``from_pretrained`` for hub reward models with custom code
            (ArmoRM needs ``True``).

    Raises:
        ValueError: ``spec`` is empty.
    """
    name = spec.strip()
    if not name:
        raise ValueError(
            "build_reward_model: empty reward spec; pass 'math' (CPU default) or a sequence-classification "
            "reward model id or path such as 'RLHFlow/ArmoRM-Llama3-8B-v0.1'"
        )
    if name.lower() == MATH_SPEC:
        return MathAnswerReward(embedder=SentenceEmbedder(device=device))
    return SequenceClassificationReward(name, device=device, trust_remote_code=trust_remote_code)
