"""The dialogue environment as a ``verifiers`` environment (``verifiers`` 0.4, its ``verifiers.v1`` API).

Needs the ``verifiers`` extra (``pip install "dialogsim[verifiers]"``). ``verifiers`` 0.4 replaced the
``MultiTurnEnv`` class (``env_response`` / ``is_completed`` / ``Rubric``) with ``verifiers.v1``: a
:class:`Taskset` yields tasks, an ``Env`` subclass's ``run(task, agents)`` plays the user of the
policy's ``interaction`` (each ``interaction.turn(message)`` sends one user message and returns the
policy's reply), and rewards are recorded on the policy's trace. The mapping:

- tasks: :class:`DialogsimTaskset` yields one :class:`DialogueTask` per prompt row from dialogsim's
  prompt selection (:func:`dialogsim.data.load_prompt_rows`, the filters, defaults and hold-out partition of
  ``build_simulator`` and the commands: every setting's default and help come from its declaration);
  the task's prompt is the row's instruction, the first user message;
- the environment's response (``MultiTurnEnv.env_response``): the simulated user of a
  :class:`~envs.DialogueEnv` asks the next question after each reply (:func:`converse`);
- completion (``is_completed``): the horizon H (or the token budget) of the episode;
- the rubric: dialogsim's reward model scores the whole dialogue at the horizon; it is recorded as the
  trace's ``dialogsim_reward`` (with metrics ``turns``, ``truncated``, ``dialogue_complete``). An episode whose
  policy run ended early (a ``verifiers`` turn limit) gets no reward and ``dialogue_complete`` = 0.

``verifiers`` finds a taskset by a top-level module name (ids with dots are not resolved in 0.4), so the
id is ``dialogsim_verifiers`` (a module of this distribution that re-exports these classes)::

    vf-eval dialogsim_verifiers -m <policy> --env.taskset.limit 32        # or prime-rl's [env] taskset.id

Or in Python::

    import verifiers.v1 as vf
    from envs.adapters.verifiers_env import DialogsimEnvConfig
    env = vf.load_environment(DialogsimEnvConfig())
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import MISSING, asdict, dataclass
from typing import Any

import verifiers.v1 as vf
from pydantic import Field

from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.data import PromptConfig, load_prompt_rows
from dialogsim.messages import Message
from dialogsim.models import DEFAULT_MODEL
from dialogsim.precision import EngineDtype
from dialogsim.settings import declared, field_names
from dialogsim.simulator import EpisodeConfig
from envs.build import build_simulator
from envs.config import EngineConfig, RewardConfig, SimulatorConfig, UserConfig, UserEngineConfig
from envs.dialogue_env import DialogueEnv

TASKSET_ID = "dialogsim_verifiers"
REWARD_NAME = "dialogsim_reward"
SIMULATOR_SETTINGS = (
    "user_model",
    "user_template",
    "backend",
    "user_backend",
    "user_base_url",
    "engine_dtype",
    "reward",
    "max_dialogue_tokens",
)  # the DialogsimEnvConfig fields that are SimulatorConfig fields


def declared_field(config: type, name: str) -> Any:
    """A pydantic field with the default and help line of the settings dataclass ``config``'s field ``name``
    (:func:`dialogsim.settings.setting`): the value is declared once, there, for ``gym.make``, the commands and
    this adapter alike."""
    spec = declared(config, name)
    if spec.default_factory is not MISSING:
        return Field(default_factory=spec.default_factory, description=spec.metadata["help"])
    return Field(spec.default, description=spec.metadata["help"])


class DialogsimTasksetConfig(vf.TasksetConfig):
    """Which prompts the tasks come from: the :class:`~dialogsim.data.PromptConfig` fields, a partition and a
    limit (as :func:`envs.build.build_simulator` takes them)."""

    id: str = TASKSET_ID
    prompts: str | None = declared_field(PromptConfig, "prompts")
    tasks: list[str] | None = declared_field(PromptConfig, "tasks")
    datasets: list[str] | None = declared_field(PromptConfig, "datasets")
    splits: list[str] | None = declared_field(PromptConfig, "splits")
    holdout: int = declared_field(PromptConfig, "holdout")
    max_prompt_tokens: int = declared_field(PromptConfig, "max_prompt_tokens")
    partition: str = Field("all", description="'train', 'heldout' or 'all'")
    limit: int | None = Field(None, description="keep at most this many prompts of the partition")
    policy_model: str = Field(DEFAULT_MODEL, description="model whose tokenizer counts prompt tokens")

    def prompt_config(self) -> PromptConfig:
        """These prompt settings as the simulator's :class:`~dialogsim.data.PromptConfig` (checked there).

        Raises:
            UsageError: a value of the wrong type or out of range.
        """
        return PromptConfig(**{name: getattr(self, name) for name in field_names(PromptConfig)})


class DialogueTaskData(vf.TaskData):
    """A prompt row as a task: ``id`` is the row id (the simulator's ``prompt_id``), ``prompt`` its instruction."""


class DialogueTask(vf.Task[DialogueTaskData, vf.State, vf.TaskConfig]):
    """One dialogue's task; its key is the prompt row id (stable across runs)."""

    @property
    def key(self) -> str:
        """The prompt row id."""
        return str(self.data.id)


class DialogsimTaskset(vf.Taskset[DialogueTask, DialogsimTasksetConfig]):
    """The prompt rows of :class:`DialogsimTasksetConfig`, as tasks (loaded through dialogsim's loader)."""

    def load(self) -> Iterator[DialogueTask]:
        """One task per prompt row, in the loader's order (:func:`dialogsim.data.load_prompt_rows`).

        Raises:
            ValueError: the prompt source, filters or partition (see :func:`dialogsim.data.load_prompt_rows`).
        """
        config = self.config
        tokenizer = load_tokenizer(config.policy_model)
        rows, _ = load_prompt_rows(config.prompt_config(), tokenizer, config.partition, config.limit)
        for row in rows:
            data = DialogueTaskData(id=row.id, name=f"{row.dataset}/{row.id}", prompt=row.instruction)
            yield DialogueTask(data, config.task)


class DialogsimEnvConfig(vf.EnvConfig):
    """The policy seat and the simulated user / reward settings (as in :func:`envs.build.build_simulator`)."""

    assistant: vf.AgentConfig = vf.AgentConfig(harness={"id": "null"})
    taskset: DialogsimTasksetConfig = DialogsimTasksetConfig()
    user_model: str = declared_field(UserConfig, "user_model")
    user_template: str = declared_field(UserConfig, "user_template")
    backend: str = declared_field(EngineConfig, "backend")
    user_backend: str = declared_field(UserEngineConfig, "user_backend")
    user_base_url: str | None = declared_field(UserEngineConfig, "user_base_url")
    engine_dtype: EngineDtype = declared_field(EngineConfig, "engine_dtype")
    reward: str = declared_field(RewardConfig, "reward")
    max_horizon: int = declared_field(EpisodeConfig, "max_horizon")
    horizon: int | None = declared_field(EpisodeConfig, "horizon")
    max_dialogue_tokens: int = declared_field(EpisodeConfig, "max_dialogue_tokens")
    seed: int = Field(0, description="seed of the per-task horizon and user draws (with the task index)")


@dataclass
class DialogueOutcome:
    """How a conversation ended: the dialogue, the reward at the horizon (NaN if none), the end flags."""

    messages: list[Message]
    reward: float
    terminated: bool
    truncated: bool

    @property
    def complete(self) -> bool:
        """The episode reached its horizon or its token budget (so it has a reward)."""
        return self.terminated or self.truncated


Reply = Callable[[str | None], Awaitable[str | None]]
"""The policy: given the next user message (``None`` for the opening prompt, which the task carries),
its reply, or ``None`` when its run has ended."""


async def converse(env: DialogueEnv, reply: Reply, lock: asyncio.Lock) -> DialogueOutcome:
    """Play the user of one reset ``env`` against ``reply`` until the horizon or the policy's end.

    The env's simulated user answers each reply (``MultiTurnEnv.env_response``); the env's reward at
    the horizon is the rubric. ``lock`` serialises the env's model calls with other episodes'.

    Raises:
        RuntimeError: ``env`` was not reset.
    """
    if env.state is None:
        raise RuntimeError("converse() needs a reset DialogueEnv")
    user_message: str | None = None
    reward, terminated, truncated = math.nan, False, False
    while not (terminated or truncated):
        answer = await reply(user_message)
        if answer is None:
            break
        async with lock:
            messages, reward, terminated, truncated, _ = await asyncio.to_thread(env.step, answer)
        user_message = messages[-1]["content"]
    messages = [dict(message) for message in env.state.messages]
    return DialogueOutcome(messages, reward if terminated or truncated else math.nan, terminated, truncated)


class DialogsimEnv(vf.Env[DialogsimEnvConfig]):
    """The policy (seat ``assistant``) talks with dialogsim's simulated user; dialogsim's reward scores it."""

    async def start(self) -> None:
        """Load the simulated user, the reward model and the prompts once per env (in a worker thread)."""
        config, taskset = self.config, self.config.taskset
        simulator_config = SimulatorConfig(
            **asdict(taskset.prompt_config()), **{name: getattr(config, name) for name in SIMULATOR_SETTINGS}
        )
        self.simulator = await asyncio.to_thread(
            build_simulator,
            simulator_config,
            partition=taskset.partition,
            policy_model=taskset.policy_model,
            max_horizon=config.max_horizon,
            horizon=config.horizon,
        )
        self.lock = asyncio.Lock()

    async def run(self, task: DialogueTask, agents: vf.Agents) -> None:
        """One dialogue: the task's prompt opens it, the simulated user answers until the horizon."""
        env = DialogueEnv(simulator=self.simulator)
        env.reset(seed=self.config.seed + (task.data.idx or 0), options={"prompt_id": task.data.id})
        async with agents.assistant.interaction(task) as interaction:

            async def reply(user_message: str | None) -> str | None:
                segment = await (interaction.turn() if user_message is None else interaction.turn(user_message))
                return None if segment.terminated else segment.last_reply

            outcome = await converse(env, reply, self.lock)
        record(interaction.trace, outcome)


def record(trace: vf.Trace, outcome: DialogueOutcome) -> None:
    """Record the reward (only for a complete dialogue) and the dialogue's shape on a ``verifiers`` trace."""
    if outcome.complete:
        trace.record_reward(REWARD_NAME, outcome.reward)
    trace.record_metrics(
        {
            "dialogue_complete": float(outcome.complete),
            "turns": float(sum(message["role"] == "assistant" for message in outcome.messages)),
            "truncated": float(outcome.truncated),
        }
    )


__all__ = ["DialogsimEnv", "DialogsimTaskset"]
