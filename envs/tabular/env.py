"""The tabular dialogue MDP as Gymnasium environments: ``dialogsim/TabularDialogue-v0`` and its vector env."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from envs.dialogue_env import DialogueEnv
from envs.tabular.mdp import TabularDialogueMDP
from envs.tabular.simulator import build_tabular_simulator
from envs.vector_env import VectorDialogueEnv


class ReplyChoice(spaces.Text):
    """A text space holding exactly the given reply strings; ``sample()`` draws one uniformly."""

    def __init__(self, choices: Sequence[str], seed: int | np.random.Generator | None = None) -> None:
        self.choices = tuple(choices)
        lengths = [len(choice) for choice in self.choices]
        charset = frozenset("".join(self.choices))
        super().__init__(max_length=max(lengths), min_length=min(lengths), charset=charset, seed=seed)

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        """A uniformly drawn reply (masks are not supported)."""
        if mask is not None or probability is not None:
            raise ValueError("ReplyChoice.sample supports neither mask nor probability")
        return self.choices[int(self.np_random.integers(len(self.choices)))]

    def contains(self, x: Any) -> bool:
        """Whether ``x`` is one of the replies."""
        return isinstance(x, str) and x in self.choices

    def __repr__(self) -> str:
        return f"ReplyChoice({self.choices})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplyChoice) and self.choices == other.choices

    __hash__ = None  # type: ignore[assignment]


class TabularDialogueEnv(DialogueEnv):
    """The tabular dialogue MDP as a Gymnasium environment (``dialogsim/TabularDialogue-v0``).

    ## Description
    The conversation of :class:`DialogueEnv` on a finite MDP: the assistant replies with one of a few
    strings, a stochastic user answers from a transition table, and the reward of the complete dialogue
    comes from a table (default :meth:`TabularDialogueMDP.clarify_first`: asking a clarifying question at
    turn 1 scores less now and more at turns 2 and 3).

    ## Action Space
    One of ``mdp.replies`` (``"a0"``, ``"a1"``, ``"a2"``), space :class:`ReplyChoice`.

    ## Observation Space
    The dialogue so far as in :class:`DialogueEnv` (``{"role", "content"}`` messages ending with a user
    message ``"u0"`` / ``"u1"``).

    ## Rewards
    0 until the last step; at the horizon ``mdp.rewards[s_H, a_H]`` (in [0, 1] for the default MDP).

    ## Starting State
    The prompt ``mdp.prompt``; H fixed by ``horizon`` or drawn uniformly from 1..max_horizon;
    ``reset(options={"snapshot": s})`` restores a state, and ``reset(options={"prefix": messages,
    "prompt_id": "tabular-0"})`` starts from a dialogue prefix s_k (a dataset reset), as in
    :class:`DialogueEnv`.

    ## Episode End
    Terminated after the reply of turn H (never truncated).

    ## Arguments
    ``mdp`` (a :class:`TabularDialogueMDP`), ``horizon`` (fixed H or ``None``), ``render_mode``.

    ## Vectorized environment
    ``gym.make_vec("dialogsim/TabularDialogue-v0", num_envs=8, vectorization_mode="vector_entry_point")``
    gives :class:`TabularVectorDialogueEnv`.

    >>> env = TabularDialogueEnv(horizon=2)
    >>> obs, info = env.reset(seed=0)
    >>> obs, reward, terminated, truncated, info = env.step("a0")
    >>> obs[-1]["content"] in ("u0", "u1"), reward, terminated
    (True, 0.0, False)
    """

    def __init__(
        self, mdp: TabularDialogueMDP | None = None, horizon: int | None = None, render_mode: str | None = None
    ) -> None:
        super().__init__(simulator=build_tabular_simulator(mdp, horizon), render_mode=render_mode)
        self.mdp: TabularDialogueMDP = self.simulator.user.mdp  # type: ignore[attr-defined]
        self.action_space = ReplyChoice(self.mdp.replies)


class TabularVectorDialogueEnv(VectorDialogueEnv):
    """N tabular dialogues advanced together (see :class:`TabularDialogueEnv` and :class:`VectorDialogueEnv`).

    Further keyword arguments (e.g. ``autoreset_mode``) go to :class:`VectorDialogueEnv`.
    """

    def __init__(
        self, num_envs: int, mdp: TabularDialogueMDP | None = None, horizon: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(num_envs, simulator=build_tabular_simulator(mdp, horizon), **kwargs)
        self.mdp: TabularDialogueMDP = self.simulator.user.mdp  # type: ignore[attr-defined]
        self.single_action_space = ReplyChoice(self.mdp.replies)
        self.action_space = batch_space(self.single_action_space, num_envs)
