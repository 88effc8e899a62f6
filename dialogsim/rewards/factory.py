"""Build a reward model from a short command-line spec."""

from __future__ import annotations

from dialogsim.rewards.base import RewardModel
from dialogsim.rewards.code_verifier import CODE_TASK, CodeTestReward
from dialogsim.rewards.embedding import SentenceEmbedder
from dialogsim.rewards.math_format import MathFormatReward
from dialogsim.rewards.math_reward import MathAnswerReward
from dialogsim.rewards.null import NoReward
from dialogsim.rewards.routed import TaskRoutedReward
from dialogsim.rewards.sequence_classification import SequenceClassificationReward

MATH_SPEC = "math"
MATH_FORMAT_SPEC = "math_format"
CODE_SPEC = "code"
VERIFIER_SPEC = "verifier"
NO_REWARD_SPEC = "none"
MATH_TASK_PREFIX = "Math"
BUILTIN_SPECS = (MATH_SPEC, MATH_FORMAT_SPEC, CODE_SPEC, VERIFIER_SPEC, NO_REWARD_SPEC)


def build_reward_model(spec: str, device: str = "cpu", trust_remote_code: bool = False) -> RewardModel:
    """The reward model named by ``spec``.

    Args:
        spec: one of

            * ``"math"`` (the CPU default): :class:`MathAnswerReward` with the embedded all-MiniLM-L6-v2;
            * ``"math_format"``: :class:`MathFormatReward`, correctness + boxed answer + the reference's
              intermediate quantities − copying the prompt, no model (``Math*`` rows);
            * ``"code"``: :class:`CodeTestReward`, the row's reference tests run on the reply's code in a
              sandboxed process (``Coding`` rows);
            * ``"verifier"``: :class:`TaskRoutedReward` sending ``Math*`` rows to ``"math"`` and
              ``Coding`` rows to ``"code"`` (others NaN);
            * ``"none"``: :class:`NoReward` (NaN for every dialogue), for dialogue generation only;
            * otherwise a Hugging Face id / local folder of a sequence-classification reward model, e.g.
              ``"Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"`` or ``"RLHFlow/ArmoRM-Llama3-8B-v0.1"``.
        device: torch device for the model(s).
        trust_remote_code: passed to ``from_pretrained`` for hub reward models with custom code
            (ArmoRM needs ``True``); ignored by the built-in specs.

    Raises:
        ValueError: ``spec`` is empty.
    """
    name = spec.strip()
    if not name:
        raise ValueError(
            f"build_reward_model: empty reward spec; pass one of {', '.join(BUILTIN_SPECS)} or a "
            "sequence-classification reward model id or path such as 'RLHFlow/ArmoRM-Llama3-8B-v0.1'"
        )
    builtin = name.lower()
    if builtin == MATH_SPEC:
        return MathAnswerReward(embedder=SentenceEmbedder(device=device))
    if builtin == MATH_FORMAT_SPEC:
        return MathFormatReward()
    if builtin == CODE_SPEC:
        return CodeTestReward()
    if builtin == VERIFIER_SPEC:
        math_reward = MathAnswerReward(embedder=SentenceEmbedder(device=device))
        return TaskRoutedReward({MATH_TASK_PREFIX: math_reward, CODE_TASK: CodeTestReward()})
    if builtin == NO_REWARD_SPEC:
        return NoReward()
    return SequenceClassificationReward(name, device=device, trust_remote_code=trust_remote_code)
