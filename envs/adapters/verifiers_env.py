"""The dialogue environment as a ``verifiers`` environment (``verifiers`` 0.4, its ``verifiers.v1`` API).

Needs the ``verifiers`` extra (``pip install "dialogsim[verifiers]"``). ``verifiers`` 0.4 replaced the
``MultiTurnEnv`` class (``env_response`` / ``is_completed`` / ``Rubric``) with ``verifiers.v1``: a
:class:`Taskset` yields tasks, an ``Env`` subclass's ``run(task, agents)`` plays the user of the
policy's ``interaction`` (each ``interaction.turn(message)`` sends one user message and returns the
policy's reply), and rewards are recorded on the policy's trace. The mapping:

- tasks: :class:`DialogsimTaskset` yields one :class:`DialogueTask` per prompt row from dialogsim's
  loader (:func:`dialogsim.data.load_prompts`, same filters and hold-out partition as ``build_simulator``);
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
from dataclasses import dataclass

import verifiers.v1 as vf
from pydantic import Field

from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.data import default_prompt_file, load_prompts
from dialogsim.messages import Message
from dialogsim.models import DEFAULT_MODEL
from dialogsim.precision import EngineDtype
from envs.build import build_simulator, select_partition
from envs.dialogue_env import DialogueEnv

TASKSET_ID = "dialogsim_verifiers"
REWARD_NAME = "dialogsim_reward"


class DialogsimTasksetConfig(vf.TasksetConfig):
    """Which prompts the tasks come from: the arguments of :func:`envs.build.build_simulator` that pick rows."""

    id: str = TASKSET_ID
    prompts: str | None = Field(None, description="prompt file or hub id; default: the shared UltraInteract file")
    tasks: list[str] | None = Field(["Math_CoT"], description="UltraInteract tasks to keep")
    datasets: list[str] | None = Field(None, description="source datasets to keep, e.g. gsm8k")
    splits: list[str] | None = Field(None, description="source splits to keep")
    holdout: int = Field(0, description="prompts reserved for evaluation (by id hash, seed 0)")
    partition: str = Field("all", description="'train', 'heldout' or 'all'")
    limit: int | None = Field(None, description="keep at most this many prompts of the partition")
    policy_model: str = Field(DEFAULT_MODEL, description="model whose tokenizer counts prompt tokens")
    max_prompt_tokens: int = Field(512, description="drop prompts longer than this (tokens)")


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
        """One task per prompt row, in the loader's order.

        Raises:
            ValueError: the prompt source or filters (see :func:`dialogsim.data.load_prompts`).
        """
        config = self.config
        rows, _ = load_prompts(
            config.prompts if config.prompts is not None else default_prompt_file(),
            tasks=config.tasks,
            datasets=config.datasets,
            splits=config.splits,
            tokenizer=load_tokenizer(config.policy_model),
            max_prompt_tokens=config.max_prompt_tokens,
        )
        for row in select_partition(rows, config.holdout, config.partition)[: config.limit]:
            data = DialogueTaskData(id=row.id, name=f"{row.dataset}/{row.id}", prompt=row.instruction)
            yield DialogueTask(data, config.task)


class DialogsimEnvConfig(vf.EnvConfig):
    """The policy seat and the simulated user / reward settings (as in :func:`envs.build.build_simulator`)."""

    assistant: vf.AgentConfig = vf.AgentConfig(harness={"id": "null"})
    taskset: DialogsimTasksetConfig = DialogsimTasksetConfig()
    user_model: str = Field(DEFAULT_MODEL, description="model of the simulated user")
    user_template: str = Field(
        "student", description="'student' (small models), 'paper', or 'replay' (each row's scripted follow-ups)"
    )
    user_backend: str = Field("transformers", description="engine of the user model: transformers, vllm, openai")
    user_base_url: str | None = Field(None, description="server of the user model when user_backend='openai'")
    engine_dtype: EngineDtype = Field(
        "auto", description="user engine and reward precision: auto (bf16 where native), float32, bfloat16, float16"
    )
    reward: str = Field("math", description="a dialogsim.rewards.factory spec or a reward model id/path")
    max_horizon: int = Field(3, description="largest horizon H (assistant turns)")
    horizon: int | None = Field(None, description="fixed H, or None to draw it from 1..max_horizon per task")
    max_dialogue_tokens: int = Field(2048, description="token budget of the whole dialogue (policy tokenizer)")
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
        self.simulator = await asyncio.to_thread(
            build_simulator,
            prompts=taskset.prompts,
            tasks=taskset.tasks,
            datasets=taskset.datasets,
            splits=taskset.splits,
            holdout=taskset.holdout,
            partition=taskset.partition,
            policy_model=taskset.policy_model,
            max_prompt_tokens=taskset.max_prompt_tokens,
            user_model=config.user_model,
            user_template=config.user_template,
            user_backend=config.user_backend,
            user_base_url=config.user_base_url,
            engine_dtype=config.engine_dtype,
            reward=config.reward,
            max_horizon=config.max_horizon,
            horizon=config.horizon,
            max_dialogue_tokens=config.max_dialogue_tokens,
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
