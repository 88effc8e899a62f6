"""An OpenEnv server for :class:`~envs.DialogueEnv`, its client, and remote env workers for the vector env.

Needs the ``openenv`` extra (``pip install "dialogsim[openenv]"``, ``openenv-core``). The server is
OpenEnv's own FastAPI app (:func:`openenv.core.env_server.http_server.create_app`), so it has OpenEnv's
routes: ``POST /reset``, ``POST /step``, ``GET /state``, ``GET /schema``, ``GET /health`` and the
``/ws`` WebSocket of persistent sessions that :class:`DialogueEnvClient` (an OpenEnv ``EnvClient``)
talks to. Every session gets its own :class:`~envs.DialogueEnv` over one shared
:class:`~dialogsim.simulator.DialogueSimulator` (the models load once per server).

Snapshot and restore extend OpenEnv's reset / step / state:

- every observation's ``info["snapshot"]`` (and ``GET /state``'s ``snapshot``) is the state s_h
  (see :meth:`DialogueEnv.snapshot`), a JSON value;
- ``reset(snapshot=s)`` restores it (also ``prompt_id``, ``horizon``, ``prefix``, as in
  :meth:`DialogueEnv.reset`'s ``options``);
- a :class:`DialogueAction` may carry ``snapshot``: the reply is then given at that state, so a step
  needs no session and any worker can serve it. This is how :class:`RemoteSimulator` lets
  :class:`~envs.VectorDialogueEnv` (or :class:`~envs.DialogueEnv`) drive remote env workers.

Serve a worker (one machine's user model and reward model)::

    python -m envs.adapters.openenv_server --port 8000 --prompts ../shared/data/ultrainteract/prompts.jsonl

and use it::

    from envs.adapters.openenv_server import DialogueAction, DialogueEnvClient
    with DialogueEnvClient(base_url="http://127.0.0.1:8000").sync() as env:
        result = env.reset(seed=0)
        result = env.step(DialogueAction(reply="Half of 48 is 24, so 48 + 24 = \\\\boxed{72}."))

or, with several workers, ``VectorDialogueEnv(num_envs=32, simulator=RemoteSimulator([url_1, url_2]))``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
from fastapi import FastAPI
from openenv.core import EnvClient, SyncEnvClient
from openenv.core.client_types import StepResult
from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State
from pydantic import Field

from dialogsim.console import EPILOG, console_command
from dialogsim.data import PromptConfig
from dialogsim.dialogue import DialogueState
from dialogsim.messages import Message
from dialogsim.precision import ENGINE_DTYPES
from dialogsim.settings import declared, default_of
from dialogsim.simulator import DialogueSimulator, EpisodeConfig, StepOutcome
from envs.build import build_simulator
from envs.config import EngineConfig, RewardConfig, UserConfig
from envs.dialogue_env import DialogueEnv

ENV_NAME = "dialogsim"


class DialogueAction(Action):
    """The assistant reply of the current turn, optionally at a given snapshot (stateless step)."""

    reply: str = Field(..., description="the assistant reply for the current turn")
    snapshot: dict[str, Any] | str | None = Field(
        default=None, description="a state s_h from info['snapshot']: restore it, then reply (no session needed)"
    )


class DialogueObservation(Observation):
    """The dialogue after a reset or a step; ``done`` is ``terminated or truncated``."""

    messages: list[dict[str, str]] = Field(default_factory=list, description="the dialogue so far (chat format)")
    terminated: bool = Field(default=False, description="the horizon was reached")
    truncated: bool = Field(default=False, description="the token budget ran out before the horizon")
    info: dict[str, Any] = Field(default_factory=dict, description="DialogueEnv's info, with 'snapshot' mid-episode")


class DialogueServerState(State):
    """``GET /state``: the session's dialogue and its snapshot, plus the server's configuration."""

    config_fingerprint: str = Field(..., description="fingerprint of the simulator (snapshots must match it)")
    max_horizon: int = Field(..., description="largest horizon H of the server's episodes")
    prompt_id: str | None = None
    turn: int = 0
    horizon: int = 0
    done: bool = False
    messages: list[dict[str, str]] = Field(default_factory=list)
    snapshot: dict[str, Any] | None = Field(default=None, description="the state s_h, None when no episode goes on")


class DialogueEnvironment(Environment[DialogueAction, DialogueObservation, DialogueServerState]):
    """OpenEnv ``Environment`` around one :class:`~envs.DialogueEnv` over a shared simulator.

    Args:
        simulator: the shared simulator (prompts, user model, reward model).
        lock: serialises calls into the shared simulator (one per server; its models are not
            thread-safe).
    """

    SUPPORTS_CONCURRENT_SESSIONS: ClassVar[bool] = True  # each session has its own DialogueEnv state

    def __init__(self, simulator: DialogueSimulator, lock: threading.Lock) -> None:
        super().__init__()
        self.env = DialogueEnv(simulator=simulator)
        self._lock = lock
        self._episode_id: str | None = None
        self._step_count = 0

    def reset(
        self,
        seed: int | None = None,
        episode_id: str | None = None,
        snapshot: dict[str, Any] | str | None = None,
        prompt_id: str | None = None,
        horizon: int | None = None,
        prefix: list[Message] | None = None,
        **kwargs: Any,
    ) -> DialogueObservation:
        """Start a dialogue or restore ``snapshot`` (arguments as :meth:`DialogueEnv.reset`'s ``options``)."""
        options = {"snapshot": snapshot, "prompt_id": prompt_id, "horizon": horizon, "prefix": prefix}
        with self._lock:
            messages, info = self.env.reset(
                seed=seed, options={key: value for key, value in options.items() if value is not None}
            )
        self._episode_id, self._step_count = episode_id, 0
        return DialogueObservation(messages=list(messages), reward=0.0, info=info)

    def step(self, action: DialogueAction, timeout_s: float | None = None, **kwargs: Any) -> DialogueObservation:
        """Reply at the current state, or at ``action.snapshot`` when given (see :meth:`DialogueEnv.step`)."""
        with self._lock:
            if action.snapshot is not None:
                self.env.reset(options={"snapshot": action.snapshot})
            messages, reward, terminated, truncated, info = self.env.step(action.reply)
        self._step_count += 1
        return DialogueObservation(
            messages=list(messages),
            reward=reward,
            done=terminated or truncated,
            terminated=terminated,
            truncated=truncated,
            info=info,
        )

    @property
    def state(self) -> DialogueServerState:
        """The session's dialogue, its snapshot (None when no episode goes on) and the server's configuration."""
        simulator, dialogue = self.env.simulator, self.env.state
        state = DialogueServerState(
            episode_id=self._episode_id,
            step_count=self._step_count,
            config_fingerprint=simulator.fingerprint,
            max_horizon=simulator.config.max_horizon,
        )
        if dialogue is not None:
            state.prompt_id, state.turn, state.horizon = dialogue.prompt_id, dialogue.turn, dialogue.horizon
            state.done, state.messages = dialogue.done, [dict(m) for m in dialogue.messages]
            state.snapshot = None if dialogue.done else self.env.snapshot()
        return state


def create_dialogue_app(simulator: DialogueSimulator, max_concurrent_envs: int = 64) -> FastAPI:
    """OpenEnv's FastAPI app serving dialogues of ``simulator``.

    Args:
        simulator: the shared simulator every session's :class:`~envs.DialogueEnv` runs on.
        max_concurrent_envs: most WebSocket sessions at once (each holds one dialogue).
    """
    factory = functools.partial(DialogueEnvironment, simulator, threading.Lock())
    return create_app(
        factory, DialogueAction, DialogueObservation, env_name=ENV_NAME, max_concurrent_envs=max_concurrent_envs
    )


class DialogueEnvClient(EnvClient[DialogueAction, DialogueObservation, DialogueServerState]):
    """OpenEnv client of a dialogsim server: one persistent session (WebSocket) per client.

    ``reset(**kwargs)`` takes ``seed``, ``snapshot``, ``prompt_id``, ``horizon``, ``prefix``. A reward
    that the server could not compute (NaN) arrives as JSON ``null`` and is NaN again here at the end
    of an episode.
    """

    def _step_payload(self, action: DialogueAction) -> dict[str, Any]:
        return action.model_dump(exclude={"metadata"})

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[DialogueObservation]:
        fields = payload.get("observation", {})
        done = bool(payload.get("done", False))
        reward = payload.get("reward")
        reward = float("nan") if reward is None and done else float(reward or 0.0)
        observation = DialogueObservation(**fields, reward=reward, done=done)
        return StepResult(observation=observation, reward=reward, done=done)

    def _parse_state(self, payload: dict[str, Any]) -> DialogueServerState:
        return DialogueServerState(**payload)


class RemoteSimulator:
    """The part of :class:`~dialogsim.simulator.DialogueSimulator` that the environments use, served by workers.

    :class:`~envs.VectorDialogueEnv` and :class:`~envs.DialogueEnv` call ``new_state``, ``restore``,
    ``step`` and ``fingerprint``; here the dialogue states stay local and each step is sent, with its
    snapshot, to an OpenEnv worker (:func:`create_dialogue_app`), so the user model and the reward
    model run there. Dialogues are spread round-robin over the ``sessions`` (one WebSocket each);
    the sessions run in parallel, each worker serves its sessions one step at a time (no batching
    across sessions within a worker). Give a URL several times for several sessions on one worker.

    Args:
        base_urls: the workers' URLs (``http://host:port``); every worker must serve the same
            configuration (same prompts, user, reward, horizon settings).

    Raises:
        ValueError: no URL, or workers with different configurations.
    """

    def __init__(self, base_urls: list[str]) -> None:
        if not base_urls:
            raise ValueError("RemoteSimulator needs at least one worker URL (http://host:port)")
        self.sessions: list[SyncEnvClient] = [DialogueEnvClient(base_url=url).sync() for url in base_urls]
        states = [session.state() for session in self.sessions]
        fingerprints = {state.config_fingerprint for state in states}
        if len(fingerprints) != 1:
            raise ValueError(
                f"workers {base_urls} serve different configurations (fingerprints {sorted(fingerprints)}); "
                "start them with the same prompts, user model, reward and horizon settings"
            )
        self.fingerprint: str = states[0].config_fingerprint
        self.max_horizon: int = states[0].max_horizon
        self._pool = ThreadPoolExecutor(max_workers=len(self.sessions))

    def new_state(self, rng: np.random.Generator, options: dict[str, Any] | None = None) -> DialogueState:
        """Start a dialogue on a worker (seeded from ``rng``); ``options`` as :meth:`DialogueSimulator.new_state`.

        Raises:
            RuntimeError: the worker refused the options (unknown prompt id, bad horizon or prefix).
        """
        seed = int(rng.integers(2**31))
        result = self.sessions[0].reset(seed=seed, **(options or {}))
        return self.restore(result.observation.info["snapshot"])

    def restore(self, snapshot: Any) -> DialogueState:
        """A local state from a snapshot, checked against the workers' configuration.

        Raises:
            SnapshotError: a corrupted or foreign snapshot.
        """
        return DialogueState.from_snapshot(snapshot, self.fingerprint, self.max_horizon)

    def step(self, states: list[DialogueState], replies: list[str]) -> list[StepOutcome]:
        """Reply in each dialogue on the workers (in parallel); states are updated in place.

        Raises:
            RuntimeError: a state is already done, or a worker failed.
        """
        for state in states:
            if state.done:
                raise RuntimeError(f"dialogue of prompt {state.prompt_id} has ended; reset it first")
        actions = [
            DialogueAction(reply=reply, snapshot=state.to_snapshot(self.fingerprint))
            for state, reply in zip(states, replies, strict=True)
        ]
        shares = [list(range(k, len(actions), len(self.sessions))) for k in range(len(self.sessions))]
        results: list[Any] = [None] * len(actions)

        def serve(session: SyncEnvClient, indices: list[int]) -> None:
            for i in indices:
                results[i] = session.step(actions[i])

        list(self._pool.map(serve, self.sessions, shares))
        return [self._apply(state, result.observation) for state, result in zip(states, results, strict=True)]

    def _apply(self, state: DialogueState, observation: DialogueObservation) -> StepOutcome:
        state.messages = [dict(m) for m in observation.messages]
        info = dict(observation.info)
        snapshot = info.pop("snapshot", None)
        for key in ("turn", "horizon", "prompt_id"):
            info.pop(key, None)
        state.done = observation.done
        if snapshot is not None:  # the env's info carries the snapshot as JSON text (Gymnasium stacks strings)
            state.rng.bit_generator.state = json.loads(snapshot)["rng_state"]
        reward = float(observation.reward) if observation.reward is not None else math.nan
        if state.done:
            state.final_reward = reward
        return StepOutcome(reward, observation.terminated, observation.truncated, info)

    def close(self) -> None:
        """Close the worker sessions."""
        for session in self.sessions:
            session.close()
        self._pool.shutdown()


SERVED_SETTINGS: tuple[tuple[type, str, dict[str, Any]], ...] = (
    (PromptConfig, "prompts", {}),
    (PromptConfig, "datasets", {"nargs": "+"}),
    (UserConfig, "user_model", {}),
    (UserConfig, "user_template", {}),
    (RewardConfig, "reward", {}),
    (EpisodeConfig, "max_horizon", {"type": int}),
    (EngineConfig, "engine_dtype", {"choices": ENGINE_DTYPES}),
)  # the simulator settings the server takes as flags (an unset flag keeps the field's declared default)


@console_command
def main(argv: list[str]) -> None:
    """Serve a dialogsim worker: ``python -m envs.adapters.openenv_server --port 8000 [--prompts FILE ...]``."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_concurrent_envs", type=int, default=64)
    for config, name, kind in SERVED_SETTINGS:
        spec = declared(config, name)
        shown = f"{spec.metadata['help']} (default: {default_of(spec)})"
        parser.add_argument(f"--{name}", default=None, help=shown, **kind)
    args = parser.parse_args(argv)
    settings = {name: getattr(args, name) for _, name, _ in SERVED_SETTINGS if getattr(args, name) is not None}
    app = create_dialogue_app(build_simulator(**settings), args.max_concurrent_envs)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
