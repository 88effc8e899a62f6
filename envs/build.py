"""Build a :class:`~dialogsim.simulator.DialogueSimulator` from names, for ``gym.make`` kwargs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dialogsim import precision
from dialogsim.backends.base import ChatBackend
from dialogsim.backends.factory import build_backend
from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.data import LoadReport, default_prompt_source, load_prompts, split_train_eval
from dialogsim.models import DEFAULT_MODEL, check_model_name
from dialogsim.prompts import PromptRow
from dialogsim.rewards.factory import build_reward_model, check_reward_scores
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import REPLAY, ReplayedUser, SimulatedUser, UserSimulator
from envs.config import SimulatorConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def build_simulator(
    config: SimulatorConfig | None = None,
    *,
    partition: str = "all",
    limit: int | None = None,
    policy_model: str = DEFAULT_MODEL,
    user_backend: str = "transformers",
    user_base_url: str | None = None,
    user_engine: ChatBackend | None = None,
    engine_dtype: str = "auto",
    vllm_kv_cache_gib: float = 4.0,
    vllm_tensor_parallel_size: int = 1,
    max_horizon: int = 3,
    horizon: int | None = None,
    reward_per_turn: bool = False,
    rows: Sequence[PromptRow] | None = None,
    **settings: Any,
) -> DialogueSimulator:
    """Load prompts, the user model, the reward model and the policy tokenizer by name.

    ``config`` (default ``SimulatorConfig()``) names the prompts, the simulated user and the reward;
    ``settings`` replace single fields of it by name (``build_simulator(tasks=["Math_CoT"], reward="none")``,
    as ``gym.make`` passes them). The other arguments are how this simulator runs: engines, partition,
    horizon.

    Args:
        config: a :class:`~envs.config.SimulatorConfig` (or a command's config, which is one). Its fields:
        prompts: prompt file (JSON Lines / Parquet) or hub id; default: :func:`dialogsim.data.default_prompt_source`
            (the shared UltraInteract-format file, else ``openbmb/UltraInteract_sft`` when online).
        tasks / datasets / splits: prompt filters (see :func:`dialogsim.data.load_prompts`).
        holdout: number of prompts reserved for evaluation (chosen by id hash, seed 0, so training
            and evaluation agree on them without sharing state).
        partition: ``"train"`` (all but the held-out prompts), ``"heldout"`` or ``"all"``.
        limit: keep at most this many prompts of the partition.
        policy_model: model whose tokenizer counts dialogue tokens (the policy's).
        user_model: model of the simulated user (loaded on its own, independent of the policy).
        user_template: ``"student"`` (small models), ``"paper"`` (the REFUEL paper's prompt), or ``"replay"``: no
            user model (``user_model`` and the engine arguments are unused), each row's scripted follow-ups
            (:class:`~dialogsim.user.ReplayedUser`); every row must script turns 2..``max_horizon``.
        user_backend / user_base_url: engine of the user model (see
            :func:`dialogsim.backends.factory.build_backend`); ``openai`` runs it on a server.
        user_engine: a running engine to run the user model on instead of building one from
            ``user_backend`` (e.g. the policy's, :func:`dialogsim.backends.serving.user_engine`).
        engine_dtype: precision of the user's engine and the reward models: ``auto`` (bf16 only where the hardware
            executes it natively) | ``float32`` | ``bfloat16`` | ``float16`` (:func:`dialogsim.precision.engine_dtype`).
        vllm_kv_cache_gib / vllm_tensor_parallel_size: the user's engine settings when ``user_backend="vllm"``.
        reward: a :func:`dialogsim.rewards.factory.build_reward_model` spec (``"math"``: verifier + MiniLM
            similarity; ``"none"``: no reward, for generation only; or a sequence-classification RM id/path).
            It must score every task of the selected rows (checked before the user and reward models load).
        trust_remote_code: let a hub reward model run its own code (ArmoRM-style heads need it).
        max_horizon / horizon / max_dialogue_tokens / reward_per_turn: see :class:`EpisodeConfig`.
        max_prompt_tokens: prompts longer than this (policy chat template, tokens) are dropped.
        rows: prompt rows already chosen (e.g. by :func:`load_prompt_rows`); when given, ``prompts``, the
            filters, ``holdout``, ``partition``, ``limit`` and ``max_prompt_tokens`` are not applied again.

    Raises:
        UsageError: before anything loads, a model name or reward that cannot be found
            (:func:`~dialogsim.models.check_model_name`, offline: absent from the local cache); after the rows
            load, a ``reward`` that cannot score some task of them (the message gives the tasks it scores and the
            ``--reward`` to use; see :func:`~dialogsim.rewards.factory.check_reward_scores`).
        ValueError: a field of ``config`` out of range, or an unknown ``engine_dtype``;
            :class:`~dialogsim.user.ScriptError` (a ValueError): ``user_template="replay"`` and rows without a
            follow-up for some turn 2..``max_horizon`` (their ids), before the user and reward models load.
        TypeError: a name in ``settings`` that is not a :class:`~envs.config.SimulatorConfig` field.
    """
    config = SimulatorConfig(**(config or SimulatorConfig()).simulator_settings() | settings)
    precision.backend_precision(engine_dtype, user_backend)  # logged; a bad value is refused before any load
    check_model_name("policy_model", policy_model)  # names first, before anything loads
    if user_engine is None and user_backend != "openai" and config.user_template != REPLAY:
        check_model_name("user_model", config.user_model)
    check_reward_scores(config.reward, None, generation_only=True)  # the reward's name; its tasks with the rows
    tokenizer = load_tokenizer(policy_model)
    if rows is None:
        rows, _ = load_prompt_rows(
            config.prompts,
            tokenizer,
            config.tasks,
            config.datasets,
            config.splits,
            config.max_prompt_tokens,
            config.holdout,
            partition,
            limit,
        )
    check_reward_scores(config.reward, {row.task for row in rows}, generation_only=True)
    user: SimulatedUser
    if config.user_template == REPLAY:  # checks every row's script now, and loads no user model
        user = ReplayedUser(rows, max_horizon)
    else:
        if user_engine is None:
            user_engine = build_backend(
                user_backend,
                config.user_model,
                base_url=user_base_url,
                dtype=engine_dtype,
                kv_cache_gib=vllm_kv_cache_gib,
                tensor_parallel_size=vllm_tensor_parallel_size,
            )
        user = UserSimulator(user_engine, config.user_template)
    episode = EpisodeConfig(
        max_horizon=max_horizon,
        horizon=horizon,
        max_dialogue_tokens=config.max_dialogue_tokens,
        reward_per_turn=reward_per_turn,
    )
    reward = build_reward_model(config.reward, trust_remote_code=config.trust_remote_code, dtype=engine_dtype)
    return DialogueSimulator(list(rows), user, reward, episode, tokenizer)


def load_prompt_rows(
    prompts: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str] | None = ("Math_CoT",),
    datasets: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    max_prompt_tokens: int | None = 384,
    holdout: int = 0,
    partition: str = "all",
    limit: int | None = None,
) -> tuple[list[PromptRow], LoadReport]:
    """The prompt rows a simulator runs on, and the load report of the rows dropped by each filter.

    :func:`dialogsim.data.load_prompts` (filters, dedupe, the ``max_prompt_tokens`` budget counted with
    ``tokenizer``), then :func:`select_partition`, then the first ``limit`` rows. ``prompts=None`` is
    :func:`dialogsim.data.default_prompt_source`. Raises what those raise.
    """
    loaded, report = load_prompts(
        prompts if prompts is not None else default_prompt_source(),
        tasks=tasks,
        datasets=datasets,
        splits=splits,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
    )
    return select_partition(loaded, holdout, partition)[:limit], report


def select_partition(rows: list[PromptRow], holdout: int, partition: str) -> list[PromptRow]:
    """The training rows, the ``holdout`` evaluation rows, or all rows.

    Raises:
        ValueError: unknown ``partition``, or ``holdout`` missing for a split partition.
    """
    if partition == "all":
        return rows
    if partition not in ("train", "heldout") or holdout < 1:
        raise ValueError(f"partition must be 'all', 'train' or 'heldout' (with holdout >= 1); got {partition!r}")
    train, heldout = split_train_eval(rows, eval_count=holdout, seed=0)
    return train if partition == "train" else heldout
