"""``VectorDialogueEnv``: N conversations advanced together with batched backend calls."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from dialogsim.dialogue import DialogueState, snapshot_text
from dialogsim.simulator import DialogueSimulator
from envs.build import build_simulator
from envs.spaces import UnicodeText, as_observation, check_option_keys, check_reply, dialogue_space

RESET_OPTIONS = ("snapshots", "prompt_ids", "horizons", "prefixes", "reset_mask")  # VectorDialogueEnv.reset's keys


class VectorDialogueEnv(VectorEnv):
    """A native vector version of :class:`envs.dialogue_env.DialogueEnv`.

    Every ``step`` appends the N replies and then makes **one** user-model call for all dialogues
    that go on and **one** reward-model call for all that end. Observations, rewards and flags are
    batched as tuples / arrays of length ``num_envs``.

    Autoreset modes (Gymnasium's ``AutoresetMode``):

    - ``NEXT_STEP`` (default): sub-environments that ended are reset on the next ``step``, whose
      action for them is ignored.
    - ``DISABLED``: ended sub-environments stay ended until ``reset(options={"reset_mask": mask})``
      restarts them; ``step`` leaves ended and never-started sub-environments untouched (their action
      is ignored, reward 0, both flags False). A masked reset may start only some sub-environments,
      so a caller can run a changing subset of conversations, as REFUEL collection does to branch
      two roll-outs from one roll-in.

    ``reset(options=...)`` accepts ``{"snapshots": [s_0, ..., s_{N-1}]}`` (restore each
    sub-environment from a snapshot dict or its JSON text), ``{"prompt_ids": [...]}``,
    ``{"horizons": [...]}``, ``{"prefixes": [...]}`` (start from a message prefix s_k, e.g. of an
    offline dialogue, with its ``prompt_ids`` entry; see :meth:`DialogueSimulator.new_state`)
    (entries may be ``None``) and ``{"reset_mask": bool array [N]}`` (reset only those; the default
    resets all). A snapshot wins over the other entries; any other key raises ``ValueError``.
    ``infos`` holds per-env arrays of ``turn``,
    ``horizon``, ``prompt_id`` and ``active`` (a dialogue is in progress) and an object array of
    ``snapshot`` JSON texts (:func:`~dialogsim.dialogue.snapshot_text`; ``None`` where no dialogue
    is in progress), as Gymnasium's ``sync`` and ``async`` modes stack the single env's
    ``info["snapshot"]``. A sub-environment that was never started observes an empty dialogue ``()``.

    Args:
        num_envs: number of parallel conversations.
        simulator: a ready simulator, or else the keyword arguments of
            :func:`envs.build.build_simulator`.
        max_reply_chars / max_message_chars: as in :class:`DialogueEnv`.
        autoreset_mode: ``AutoresetMode.NEXT_STEP`` or ``AutoresetMode.DISABLED``.

    Raises:
        ValueError: ``num_envs`` < 1, or an unsupported ``autoreset_mode``.
    """

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int,
        simulator: DialogueSimulator | None = None,
        max_reply_chars: int = 16_384,
        max_message_chars: int = 65_536,
        autoreset_mode: AutoresetMode = AutoresetMode.NEXT_STEP,
        **build_kwargs: Any,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED):
            raise ValueError(f"autoreset_mode must be NEXT_STEP or DISABLED, got {autoreset_mode!r}")
        self.metadata = {"autoreset_mode": autoreset_mode}
        self.simulator = simulator if simulator is not None else build_simulator(**build_kwargs)
        self.num_envs = num_envs
        self.single_action_space = UnicodeText(max_length=max_reply_chars, min_length=0)
        self.single_observation_space = dialogue_space(max_message_chars)
        # One shared sub-space instance per batch (batch_space deep-copies it N times: slow for large N).
        self.action_space = spaces.Tuple((self.single_action_space,) * num_envs)
        self.observation_space = spaces.Tuple((self.single_observation_space,) * num_envs)
        self.states: list[DialogueState | None] = [None] * num_envs

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[tuple[tuple[dict[str, str], ...], ...], dict[str, Any]]:
        """Start (or restore) the N dialogues, or the masked ones; see the class docstring for ``options``.

        Raises:
            ValueError: an unknown ``options`` key (accepted: :data:`RESET_OPTIONS`); an ``options`` list or
                mask whose length is not ``num_envs``; a bad prefix or horizon (see
                :meth:`DialogueSimulator.new_state`).
            KeyError: an unknown prompt id.
        """
        super().reset(seed=seed if isinstance(seed, int) or seed is None else int(seed[0]))
        options = options or {}
        check_option_keys(options, RESET_OPTIONS, "VectorDialogueEnv.reset")
        snapshots = self._per_env(options, "snapshots")
        prompt_ids = self._per_env(options, "prompt_ids")
        horizons = self._per_env(options, "horizons")
        prefixes = self._per_env(options, "prefixes")
        mask = self._per_env(options, "reset_mask") if "reset_mask" in options else [True] * self.num_envs
        for i in (i for i in range(self.num_envs) if mask[i]):
            if snapshots[i] is not None:
                self.states[i] = self.simulator.restore(snapshots[i])
            else:
                start = {"prompt_id": prompt_ids[i], "horizon": horizons[i], "prefix": prefixes[i]}
                self.states[i] = self.simulator.new_state(
                    self.np_random, {key: value for key, value in start.items() if value is not None}
                )
        return self._observations(), self._infos()

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Advance every dialogue by one reply; one batched user call and one batched reward call.

        All N actions are checked before any dialogue changes, and an error inside the step (a backend or
        reward failure) leaves every dialogue as it was: one bad slot never corrupts the others.

        Raises:
            TypeError: ``actions`` is not a sequence of N ``str`` (names the offending index).
            ValueError: an action is too long or holds a surrogate code point (names the offending index).
        """
        actions = self._check_actions(actions)
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        live = [i for i, state in enumerate(self.states) if state is not None and not state.done]
        outcomes = self.simulator.step([self.states[i] for i in live], [actions[i] for i in live])
        if self.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP:  # after the step: none if it raised
            for i in sorted(set(range(self.num_envs)) - set(live)):
                self.states[i] = self.simulator.new_state(self.np_random)
        for i, outcome in zip(live, outcomes, strict=True):
            rewards[i], terminated[i], truncated[i] = outcome.reward, outcome.terminated, outcome.truncated
        return self._observations(), rewards, terminated, truncated, self._infos()

    def _per_env(self, options: dict[str, Any], key: str) -> list[Any]:
        values = options.get(key)
        if values is None:
            return [None] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError(f"options[{key!r}] has {len(values)} entries; expected num_envs={self.num_envs}")
        return list(values)

    def _check_actions(self, actions: Any) -> list[str]:
        if isinstance(actions, str) or len(actions) != self.num_envs:
            raise TypeError(f"actions must be a sequence of {self.num_envs} reply strings, got {actions!r:.80}")
        return [check_reply(action, self.single_action_space, f"actions[{i}]") for i, action in enumerate(actions)]

    def _observations(self) -> tuple[tuple[dict[str, str], ...], ...]:
        return tuple(as_observation(state.messages) if state is not None else () for state in self.states)

    def _infos(self) -> dict[str, Any]:
        active = [state is not None and not state.done for state in self.states]
        return {
            "turn": np.array([state.turn if state is not None else 0 for state in self.states]),
            "horizon": np.array([state.horizon if state is not None else 0 for state in self.states]),
            "prompt_id": np.array(
                [state.prompt_id if state is not None else None for state in self.states], dtype=object
            ),
            "active": np.array(active),
            "snapshot": np.array(
                [
                    snapshot_text(state.to_snapshot(self.simulator.fingerprint)) if live else None
                    for state, live in zip(self.states, active, strict=True)
                ],
                dtype=object,
            ),
        }
