"""``DialogueEnv``: one conversation between the agent (the policy) and a simulated user."""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym

from dialogsim.dialogue import DialogueState, snapshot_text
from dialogsim.simulator import DialogueSimulator
from envs.build import build_simulator
from envs.spaces import UnicodeText, as_observation, check_option_keys, check_reply, dialogue_space

RESET_OPTIONS = ("snapshot", "prompt_id", "horizon", "prefix")  # the keys DialogueEnv.reset accepts


class DialogueEnv(gym.Env):
    """A multi-turn conversation with a simulated user over real prompts.

    ## Description
    The agent is the assistant. Each episode starts from an UltraInteract-format prompt (the first
    user message). After each assistant reply the simulated user (an LLM prompted to ask the next
    question, see :mod:`dialogsim.user`) adds a user message, until the horizon H (≤ 5) is reached.
    This is the environment of REFUEL (Gao et al., ICLR 2025, arXiv 2410.04612, §3).

    ## Action Space
    The assistant reply for the current turn: a ``str`` (any Unicode, at most ``max_reply_chars``
    characters), space :class:`envs.spaces.UnicodeText`.

    ## Observation Space
    The dialogue so far, ending with the current user message: a tuple of
    ``{"role": "user" | "assistant" | "system", "content": str}`` dicts (the ``transformers`` chat
    format), space ``Sequence(Dict(role=Text, content=UnicodeText))``. Pass it straight to
    ``tokenizer.apply_chat_template(list(obs), add_generation_prompt=True)``.

    ## Rewards
    By default 0 until the last step; at the horizon (or on truncation) the reward model scores the
    complete dialogue (the CPU default ``"math"``: 1[final answer correct] + 0.5 · MiniLM cosine of
    the last reply to the reference solution, in [-0.5, 1.5]). With ``reward_per_turn=True`` every
    step is scored. A reward that cannot be computed is NaN and its reason is counted in
    ``env.unwrapped.simulator.reward.failures``.

    ## Starting State
    A prompt drawn uniformly with ``self.np_random`` (or ``options["prompt_id"]``), horizon H fixed
    by ``horizon`` or drawn uniformly from 1..``max_horizon`` (or ``options["horizon"]``).
    ``reset(options={"snapshot": s})`` restores the state s_h saved by :meth:`snapshot`: the same
    messages, turn, horizon and user RNG, so the next user message is the same for the same reply.
    ``reset(options={"prefix": messages, "prompt_id": id})`` starts from a message prefix s_k instead
    of s_1 (e.g. the first k user messages of an offline dialogue, ending with a user message; H is
    ``options["horizon"]`` or drawn from k..max_horizon): the policy answers turn k and the simulated
    user continues the dialogue from there (see :meth:`DialogueSimulator.new_state`). Any other
    ``options`` key raises ``ValueError`` (a typo such as ``"snapshots"`` would otherwise start afresh).

    ## Episode End
    Terminated after the assistant reply of turn H. Truncated when the chat-templated dialogue
    exceeds ``max_dialogue_tokens`` before the horizon.

    ## Arguments
    ``simulator`` (a ready :class:`~dialogsim.simulator.DialogueSimulator`), or the keyword arguments
    of :func:`envs.build.build_simulator`: the fields of :class:`~envs.config.SimulatorConfig` (``prompts``,
    ``tasks``, ``datasets``, ``splits``, ``holdout``, ``max_prompt_tokens``, ``user_model``, ``user_template``,
    ``max_dialogue_tokens``, ``reward``, the engines' ``user_backend``, ``engine_dtype``, …) and of
    :class:`~dialogsim.simulator.EpisodeConfig` (``max_horizon``, ``horizon``, ``reward_per_turn``), and
    ``partition``, ``limit``, ``policy_model``. Each value is checked against the type and range declared on its
    field before anything loads (``max_horizon=7`` raises ``UsageError``, a ``ValueError``). Also
    ``max_reply_chars`` (action length cap, characters) and ``max_message_chars`` (observation cap).

    ``info`` holds ``turn`` (h of the observation), ``horizon``, ``prompt_id``; after a step also
    ``replied_turn``, ``dialogue_tokens`` (tokens), ``user_parsed``; and ``snapshot`` (while the
    episode goes on): the JSON text of :meth:`snapshot` (a ``str``, so that Gymnasium's vector envs
    can stack it), which ``reset(options={"snapshot": ...})`` takes as it is.

    ## Vectorized environment
    ``gym.make_vec("dialogsim/UltraInteract-v0", num_envs=N, vectorization_mode=...)`` with

    - ``"vector_entry_point"`` (the default): :class:`envs.vector_env.VectorDialogueEnv`, one process,
      one batched user-model call and one batched reward call per step for all N conversations
      (REFUEL collection uses it);
    - ``"async"`` with ``vector_kwargs={"shared_memory": False, "context": "spawn"}``: Gymnasium's ``AsyncVectorEnv``,
      one worker process per conversation, each loading its own models once; Gymnasium first builds
      one env in the main process to read the spaces (dialogues are variable-length text, which
      cannot live in shared memory; without the flag ``make_vec`` raises a ``TypeError`` saying so,
      see :class:`envs.spaces.DialogueSpace`; spawned workers, as a forked one fails once PyTorch's
      thread pool has run in the parent);
    - ``"sync"``: Gymnasium's ``SyncVectorEnv``, N single envs stepped one after another in this
      process (one model call per conversation; for compatibility with tools that expect it; pass
      one ``simulator=`` to share the models, otherwise each env loads its own).

    In ``sync`` and ``async`` mode ``infos["snapshot"][i]`` restores conversation i in any env of
    the same configuration.

    >>> import gymnasium as gym, envs
    >>> env = gym.make("dialogsim/UltraInteract-v0", max_horizon=2)  # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)  # doctest: +SKIP
    >>> obs, reward, terminated, truncated, info = env.step("The answer is \\\\boxed{72}.")  # doctest: +SKIP
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"]}

    def __init__(
        self,
        simulator: DialogueSimulator | None = None,
        max_reply_chars: int = 16_384,
        max_message_chars: int = 65_536,
        render_mode: str | None = None,
        **build_kwargs: Any,
    ) -> None:
        self.simulator = simulator if simulator is not None else build_simulator(**build_kwargs)
        self.action_space = UnicodeText(max_length=max_reply_chars, min_length=0)
        self.observation_space = dialogue_space(max_message_chars)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        self.state: DialogueState | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[tuple[dict[str, str], ...], dict[str, Any]]:
        """Start a dialogue (from s_1 or ``options["prefix"]``), or restore ``options["snapshot"]``.

        See the class docstring, ``## Starting State``.

        Raises:
            KeyError: unknown ``options["prompt_id"]``.
            ValueError: an unknown ``options`` key (accepted: :data:`RESET_OPTIONS`); a bad ``horizon`` or
                ``prefix`` (see :meth:`DialogueSimulator.new_state`).
            SnapshotError: a corrupted or foreign snapshot, or one whose first user message is not its
                prompt row's instruction.
        """
        super().reset(seed=seed)
        options = options or {}
        check_option_keys(options, RESET_OPTIONS, "DialogueEnv.reset")
        if "snapshot" in options:
            self.state = self.simulator.restore(options["snapshot"])
        else:
            self.state = self.simulator.new_state(self.np_random, options)
        return as_observation(self.state.messages), self._info({})

    def step(self, action: str) -> tuple[tuple[dict[str, str], ...], float, bool, bool, dict[str, Any]]:
        """Append the assistant reply, then the user's next question or the final reward.

        Raises:
            RuntimeError: called before ``reset`` or after the episode ended.
            TypeError: ``action`` is not a ``str``.
            ValueError: ``action`` is longer than ``max_reply_chars`` or holds a surrogate code point.

        Any error leaves the dialogue as it was before the call (the action is checked first, and the
        simulator undoes a partial step), so the episode can go on with another reply.
        """
        if self.state is None or self.state.done:
            raise RuntimeError("DialogueEnv.step() called after the episode ended (or before reset); call reset()")
        (outcome,) = self.simulator.step([self.state], [check_reply(action, self.action_space, "action")])
        info = self._info(outcome.info)
        return as_observation(self.state.messages), outcome.reward, outcome.terminated, outcome.truncated, info

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the current state s_h (see :class:`DialogueState`).

        Raises:
            RuntimeError: before ``reset``.
            SnapshotError: after the episode ended.
        """
        if self.state is None:
            raise RuntimeError("call reset() before snapshot()")
        return self.state.to_snapshot(self.simulator.fingerprint)

    def render(self) -> str | None:
        """The dialogue as text (``render_mode="ansi"``)."""
        if self.render_mode != "ansi" or self.state is None:
            return None
        return "\n\n".join(f"[{m['role']}] {m['content']}" for m in self.state.messages)

    def _info(self, step_info: dict[str, Any]) -> dict[str, Any]:
        assert self.state is not None
        info = {"turn": self.state.turn, "horizon": self.state.horizon, "prompt_id": self.state.prompt_id}
        info.update(step_info)
        if not self.state.done:
            info["snapshot"] = snapshot_text(self.snapshot())
        return info
