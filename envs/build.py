"""Build a :class:`~dialogsim.simulator.DialogueSimulator` from names, for ``gym.make`` kwargs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dialogsim import precision
from dialogsim.backends.base import ChatBackend
from dialogsim.backends.factory import build_backend
from dialogsim.backends.serving import resolve_user_backend
from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.data import load_prompt_rows
from dialogsim.models import DEFAULT_MODEL, check_model_name
from dialogsim.prompts import PromptRow
from dialogsim.rewards.factory import build_reward_model, check_reward_scores
from dialogsim.settings import field_names
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import REPLAY, ReplayedUser, SimulatedUser, UserSimulator
from envs.config import SimulatorConfig

SIMULATOR_FIELDS = field_names(SimulatorConfig)
EPISODE_FIELDS = field_names(EpisodeConfig)


def check_model_names(config: SimulatorConfig, policy_model: str, *, user_engine_given: bool = False) -> None:
    """Check the model names a simulator will load, before anything loads: the policy's (its tokenizer) and the
    simulated user's, unless no user model is loaded (``user_template="replay"``, a user served by ``openai``,
    or ``user_engine_given``: the user runs on an engine already built).

    Raises:
        UsageError: a name that is neither an embedded name, a folder nor a hub id (offline: nor in the local
            cache); see :func:`~dialogsim.models.check_model_name`.
    """
    check_model_name("policy_model", policy_model)
    user_backend = resolve_user_backend(config.user_backend, config.backend)
    if not user_engine_given and user_backend != "openai" and config.user_template != REPLAY:
        check_model_name("user_model", config.user_model)


def build_simulator(
    config: SimulatorConfig | None = None,
    *,
    partition: str = "all",
    limit: int | None = None,
    policy_model: str = DEFAULT_MODEL,
    user_engine: ChatBackend | None = None,
    rows: Sequence[PromptRow] | None = None,
    **settings: Any,
) -> DialogueSimulator:
    """Load prompts, the user model, the reward model and the policy tokenizer by name.

    ``config`` (default ``SimulatorConfig()``) names the prompts, the simulated user, the reward and the engines;
    ``settings`` replace single fields of it, or set the :class:`~dialogsim.simulator.EpisodeConfig`'s, by name
    (``build_simulator(tasks=["Math_CoT"], reward="none", max_horizon=2)``, as ``gym.make`` passes them). Every
    value is checked (type and range, declared on the field) before anything loads. Defaults, ranges and help of
    the fields: :class:`~envs.config.SimulatorConfig` and :class:`~dialogsim.simulator.EpisodeConfig`.

    Args:
        config: a :class:`~envs.config.SimulatorConfig` (or a command's config, which is one). Its fields:
        prompts / tasks / datasets / splits / holdout / max_prompt_tokens: which prompt rows
            (:class:`~dialogsim.data.PromptConfig`, :func:`~dialogsim.data.load_prompt_rows`); ``holdout``
            prompts are reserved for evaluation (by id hash, seed 0, so training and evaluation agree on them).
        user_model / user_template: the simulated user; ``user_template="replay"``: no user model (``user_model``
            and the engines are unused), each row's scripted follow-ups (:class:`~dialogsim.user.ReplayedUser`);
            every row must script turns 2..``max_horizon``.
        backend / user_backend / user_base_url: the user model's engine (``user_backend="auto"``: the policy's
            ``backend``, see :func:`dialogsim.backends.factory.build_backend`); ``openai`` runs it on a server.
        engine_dtype: precision of the user's engine and the reward models (:func:`dialogsim.precision.engine_dtype`).
        vllm_kv_cache_gib / vllm_tensor_parallel_size: the user's engine settings on vLLM.
        reward / trust_remote_code: a :func:`dialogsim.rewards.factory.build_reward_model` spec; it must score
            every task of the selected rows (checked before the user and reward models load).
        max_dialogue_tokens: the dialogue's token budget (also the episode's).
        partition: ``"train"`` (all but the held-out prompts), ``"heldout"`` or ``"all"``.
        limit: keep at most this many prompts of the partition.
        policy_model: model whose tokenizer counts dialogue tokens (the policy's).
        user_engine: a running engine to run the user model on instead of building one from the engine settings
            (e.g. the policy's, :func:`dialogsim.backends.serving.user_engine`).
        rows: prompt rows already chosen (e.g. by :func:`~dialogsim.data.load_prompt_rows`); when given, the
            prompt fields, ``partition`` and ``limit`` are not applied again.
        settings: fields of ``config`` by name, and ``max_horizon`` / ``horizon`` / ``reward_per_turn`` (see
            :class:`~dialogsim.simulator.EpisodeConfig`).

    Raises:
        UsageError: before anything loads, a field out of range or of the wrong type (e.g. ``max_horizon=7``), a
            model name or reward that cannot be found (:func:`~dialogsim.models.check_model_name`, offline:
            absent from the local cache); after the rows load, a ``reward`` that cannot score some task of them
            (the message gives the tasks it scores and the ``--reward`` to use; see
            :func:`~dialogsim.rewards.factory.check_reward_scores`).
        ValueError: :class:`~dialogsim.user.ScriptError`: ``user_template="replay"`` and rows without a
            follow-up for some turn 2..``max_horizon`` (their ids), before the user and reward models load.
        TypeError: a name in ``settings`` that is neither a :class:`~envs.config.SimulatorConfig` nor an
            :class:`~dialogsim.simulator.EpisodeConfig` field.
    """
    unknown = sorted(set(settings) - set(SIMULATOR_FIELDS) - set(EPISODE_FIELDS))
    if unknown:
        raise TypeError(
            f"build_simulator() got unknown settings {unknown}; valid: {', '.join(SIMULATOR_FIELDS + EPISODE_FIELDS)}"
        )
    given = (config or SimulatorConfig()).simulator_settings()
    config = SimulatorConfig(**given | {name: settings[name] for name in SIMULATOR_FIELDS if name in settings})
    episode = EpisodeConfig(
        **{name: settings[name] for name in EPISODE_FIELDS if name in settings}
        | {"max_dialogue_tokens": config.max_dialogue_tokens}
    )
    user_backend = resolve_user_backend(config.user_backend, config.backend)
    precision.backend_precision(config.engine_dtype, user_backend)  # logged once
    check_model_names(config, policy_model, user_engine_given=user_engine is not None)
    check_reward_scores(config.reward, None, generation_only=True)  # the reward's name; its tasks with the rows
    tokenizer = load_tokenizer(policy_model)
    if rows is None:
        rows, _ = load_prompt_rows(config, tokenizer, partition, limit)
    check_reward_scores(config.reward, {row.task for row in rows}, generation_only=True)
    user: SimulatedUser
    if config.user_template == REPLAY:  # checks every row's script now, and loads no user model
        user = ReplayedUser(rows, episode.max_horizon)
    else:
        if user_engine is None:
            user_engine = build_backend(
                user_backend,
                config.user_model,
                base_url=config.user_base_url,
                dtype=config.engine_dtype,
                kv_cache_gib=config.vllm_kv_cache_gib,
                tensor_parallel_size=config.vllm_tensor_parallel_size,
            )
        user = UserSimulator(user_engine, config.user_template)
    reward = build_reward_model(config.reward, trust_remote_code=config.trust_remote_code, dtype=config.engine_dtype)
    return DialogueSimulator(list(rows), user, reward, episode, tokenizer)
