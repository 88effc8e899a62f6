"""A tabular multi-turn dialogue MDP behind the same simulator, environment and REFUEL code path as the LLM env.

Only the policy and the user differ from the LLM setting: replies and user messages are short strings
(``"a0".."a2"``, ``"u0"``, ``"u1"``), the policy is a softmax table over dialogue states
(:class:`TabularPolicy`, a :class:`~dialogsim.backends.base.ChatBackend`), the user samples its next
message from a transition table (:class:`TabularUser`) and the reward model looks the score of the
complete dialogue up in a table (:class:`TabularReward`). :func:`build_tabular_simulator` puts them into
an ordinary :class:`~dialogsim.simulator.DialogueSimulator`, so ``refuel.collect.collect_pairs`` and the
Gymnasium environments run on it unchanged.

A state s_h is read from the dialogue up to and including the h-th user message: either the whole
dialogue (``memory="dialogue"``: a tree of 1 + 6 + 36 = 43 states for three replies, two user messages
and ``max_horizon = 3``) or the turn and the last user message (``memory="last_message"``: 5 states,
exact for the default :meth:`TabularDialogueMDP.clarify_first`, whose user and reward look no further).

Exact dynamic programming (all tensors float64, rewards in reward-model units):

- :func:`q_values`: Q^π(s, a) and V^π(s) for every state, for any horizon distribution given as
  per-turn stop probabilities (:func:`stop_probs`).
- :func:`optimal_q_values` / :func:`greedy_policy`: Q*, V* and an optimal policy.
- :func:`kl_regularized_optimum`: the optimum of E[r] − (1/β) Σ_h KL(π(·|s_h) ‖ π_ref(·|s_h)) for a fixed
  reference π_ref (soft dynamic programming).
- :func:`state_distribution`, :func:`turn_values`, :func:`policy_value`, :func:`turn_win_rates`: the
  roll-in distribution d^π_h, the per-turn value V_h(π) = E_π[r(τ_{1:h})], the expected episode reward,
  and the exact per-turn win rate against a baseline policy.

The algorithm side (the mirror-descent update, the REFUEL regression on a table, the training loop)
lives in :mod:`refuel.tabular`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from dialogsim.backends.base import Completion
from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import UserTemplate, UserTurn
from envs.dialogue_env import DialogueEnv
from envs.vector_env import VectorDialogueEnv

REPLIES = ("a0", "a1", "a2")
USER_MESSAGES = ("u0", "u1")
PROMPT_ID = "tabular-0"
DTYPE = torch.float64


MEMORIES = ("dialogue", "last_message")


def _geometry(
    max_horizon: int, n_replies: int, n_user_messages: int, memory: str
) -> tuple[tuple[int, ...], torch.Tensor]:
    """The state layout: first global index of each turn 1..H_max then the count ``[H_max + 1]``, and
    the successor table ``[n_states_before_last_turn, n_replies, n_user_messages]`` (global indices).

    Raises:
        ValueError: unknown ``memory`` or ``max_horizon`` < 1.
    """
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    if max_horizon < 1:
        raise ValueError(f"max_horizon must be >= 1, got {max_horizon}")
    sizes = [1]
    for _ in range(max_horizon - 1):
        sizes.append(sizes[-1] * n_replies * n_user_messages if memory == "dialogue" else n_user_messages)
    offsets = tuple(int(x) for x in np.cumsum([0, *sizes]))
    children = torch.empty(offsets[-2], n_replies, n_user_messages, dtype=torch.int64)
    for turn in range(1, max_horizon):
        for local in range(sizes[turn - 1]):
            for reply in range(n_replies):
                for user in range(n_user_messages):
                    child = (local * n_replies + reply) * n_user_messages + user if memory == "dialogue" else user
                    children[offsets[turn - 1] + local, reply, user] = offsets[turn] + child
    return offsets, children


class TabularDialogueError(ValueError):
    """A dialogue is not a dialogue of the tabular MDP (unknown text, wrong role order, too many turns)."""


@dataclass(frozen=True, eq=False)
class TabularDialogueMDP:
    """A finite multi-turn dialogue MDP whose states are read from the dialogue's messages.

    States are indexed turn by turn (``turn_slice(h)`` gives the global indices of turn h); turn 1 holds
    the single start state (the prompt), and ``children[s, a, u]`` is the state after reply a at s and
    the user's message u. What a state remembers is set by ``memory``:

    - ``"dialogue"``: the whole dialogue s_h = (u_1, a_1, ..., u_h), a tree with
      ``(n_replies · n_user_messages) ** (h − 1)`` states at turn h (1 + 6 + 36 = 43 for the default
      sizes); the child of local index i is ``(i · n_replies + a) · n_user_messages + u``.
    - ``"last_message"``: the turn h and the last user message u_h (1 + 2 + 2 = 5 states); exact when
      the user and the reward depend on the dialogue only through them (as in :meth:`clarify_first`).

    Attributes:
        user_probs: P(u_{h+1} | s_h, a_h), ``[n_states_before_last_turn, n_replies, n_user_messages]``,
            rows sum to 1; the states of the last turn have no successor.
        rewards: r(s_h, a_h), the reward-model score of the complete dialogue that ends with reply a_h at
            state s_h (a dialogue of h turns), ``[n_states, n_replies]`` (reward units).
        max_horizon: H_max, the number of turns of the longest dialogue.
        memory: ``"dialogue"`` or ``"last_message"`` (see above).
        replies: the reply texts (the policy's actions).
        user_messages: the user message texts after turn 1.
        prompt: the first user message (the instruction of the only prompt row).
        name: a label; the fingerprint of the tables is appended in :attr:`model_name`.
        turn_offsets: (derived) global index of the first state of turns 1..H_max, then the number of
            states, ``[H_max + 1]``.
        children: (derived) successor states ``[n_states_before_last_turn, n_replies, n_user_messages]``
            (global indices).

    Raises:
        ValueError: shapes that disagree with the tree, probabilities that do not sum to 1, or duplicate
            texts.
    """

    user_probs: torch.Tensor
    rewards: torch.Tensor
    max_horizon: int = 3
    memory: str = "dialogue"
    replies: tuple[str, ...] = REPLIES
    user_messages: tuple[str, ...] = USER_MESSAGES
    prompt: str = "u0"
    name: str = "tabular"
    turn_offsets: tuple[int, ...] = field(init=False, repr=False)
    children: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        offsets, children = _geometry(self.max_horizon, self.n_replies, self.n_user_messages, self.memory)
        object.__setattr__(self, "turn_offsets", offsets)
        object.__setattr__(self, "children", children)
        if len(set(self.replies)) != len(self.replies) or set(self.replies) & set(self.user_messages):
            raise ValueError(f"reply texts {self.replies} must be distinct and differ from the user messages")
        if len(set(self.user_messages)) != len(self.user_messages):
            raise ValueError(f"user message texts {self.user_messages} must be distinct")
        if self.prompt in self.replies:
            raise ValueError(f"the prompt {self.prompt!r} must not be a reply text")
        object.__setattr__(self, "user_probs", torch.as_tensor(self.user_probs, dtype=DTYPE))
        object.__setattr__(self, "rewards", torch.as_tensor(self.rewards, dtype=DTYPE))
        expected = (self.turn_offsets[-2], self.n_replies, self.n_user_messages)
        if tuple(self.user_probs.shape) != expected:
            raise ValueError(f"user_probs has shape {tuple(self.user_probs.shape)}; the states need {expected}")
        if tuple(self.rewards.shape) != (self.n_states, self.n_replies):
            raise ValueError(
                f"rewards has shape {tuple(self.rewards.shape)}; the states need {(self.n_states, self.n_replies)}"
            )
        if (self.user_probs < 0).any() or not torch.allclose(
            self.user_probs.sum(-1), torch.ones((), dtype=DTYPE), atol=1e-9
        ):
            raise ValueError("user_probs must be non-negative and sum to 1 over the user messages (last axis)")
        if not torch.isfinite(self.rewards).all():
            raise ValueError("rewards must be finite")

    @property
    def n_replies(self) -> int:
        """A, the number of reply choices per turn."""
        return len(self.replies)

    @property
    def n_user_messages(self) -> int:
        """U, the number of user messages the user chooses from after each reply."""
        return len(self.user_messages)

    @property
    def n_states(self) -> int:
        """Number of states over all turns."""
        return self.turn_offsets[-1]

    def turn_slice(self, turn: int) -> slice:
        """Global state indices of turn ``turn`` (1-based)."""
        if not 1 <= turn <= self.max_horizon:
            raise ValueError(f"turn must be in 1..{self.max_horizon}, got {turn}")
        return slice(self.turn_offsets[turn - 1], self.turn_offsets[turn])

    @cached_property
    def state_turns(self) -> torch.Tensor:
        """Turn h of every state, ``[n_states]`` (int64)."""
        turns = torch.empty(self.n_states, dtype=torch.int64)
        for turn in range(1, self.max_horizon + 1):
            turns[self.turn_slice(turn)] = turn
        return turns

    @cached_property
    def model_name(self) -> str:
        """``name`` plus a fingerprint of the tables (enters the simulator's config fingerprint)."""
        digest = hashlib.sha256()
        for tensor in (self.user_probs, self.rewards):
            digest.update(tensor.numpy().tobytes())
        digest.update(repr((self.max_horizon, self.memory, self.replies, self.user_messages, self.prompt)).encode())
        return f"{self.name}-{digest.hexdigest()[:12]}"

    def child(self, state: int, reply: int, user_message: int) -> int:
        """Global index of the state after ``reply`` at ``state`` and the user's ``user_message``.

        Raises:
            ValueError: ``state`` is at the last turn (it has no successor).
        """
        turn = int(self.state_turns[state])
        if turn >= self.max_horizon:
            raise ValueError(f"state {state} is at the last turn {turn}; it has no successor")
        return int(self.children[state, reply, user_message])

    def state_index(self, messages: Sequence[Message]) -> int:
        """Index of the state s_h a dialogue ending with its h-th user message is in.

        Raises:
            TabularDialogueError: naming the offending message index (unknown text, role order, prompt,
                or more than ``max_horizon`` turns).
        """
        key = tuple((message.get("role"), message.get("content")) for message in messages)
        if key not in self._state_cache:
            self._state_cache[key] = self._find_state(messages)
        return self._state_cache[key]

    @cached_property
    def _state_cache(self) -> dict[tuple[tuple[Any, Any], ...], int]:
        return {}

    def _find_state(self, messages: Sequence[Message]) -> int:
        if not messages or len(messages) % 2 == 0:
            raise TabularDialogueError(
                f"a tabular state is a dialogue of 2h - 1 messages ending with a user message; got {len(messages)}"
            )
        if len(messages) > 2 * self.max_horizon - 1:
            raise TabularDialogueError(
                f"dialogue has {(len(messages) + 1) // 2} user messages; the MDP has at most {self.max_horizon} turns"
            )
        for index, message in enumerate(messages):
            expected = "user" if index % 2 == 0 else "assistant"
            if message.get("role") != expected:
                raise TabularDialogueError(f"message {index} has role {message.get('role')!r}, expected {expected!r}")
        if messages[0]["content"] != self.prompt:
            raise TabularDialogueError(
                f"message 0 must be the prompt {self.prompt!r}, got {messages[0]['content']!r:.40}"
            )
        state = 0
        for index in range(1, len(messages), 2):
            reply = self.reply_index(messages[index]["content"], where=f"message {index}")
            user_message = self._user_message_index(messages[index + 1]["content"], index + 1)
            state = self.child(state, reply, user_message)
        return state

    def reply_index(self, text: str, where: str = "reply") -> int:
        """Index of a reply text.

        Raises:
            TabularDialogueError: the text is not one of :attr:`replies`.
        """
        try:
            return self.replies.index(text)
        except ValueError:
            raise TabularDialogueError(f"{where}: {text!r:.40} is not a reply of the MDP {self.replies}") from None

    def _user_message_index(self, text: str, index: int) -> int:
        try:
            return self.user_messages.index(text)
        except ValueError:
            raise TabularDialogueError(
                f"message {index}: {text!r:.40} is not a user message of the MDP {self.user_messages}"
            ) from None

    @cached_property
    def _parents(self) -> dict[int, tuple[int, int, int]]:
        """For each state after turn 1, the first (parent, reply, user message) that leads to it."""
        parents: dict[int, tuple[int, int, int]] = {}
        for parent, row in enumerate(self.children.tolist()):
            for reply, users in enumerate(row):
                for user_message, child in enumerate(users):
                    parents.setdefault(child, (parent, reply, user_message))
        return parents

    @cached_property
    def last_user_messages(self) -> torch.Tensor:
        """Index of the last user message u_h of every state, ``[n_states]`` (the prompt's: -1 if not listed)."""
        last = torch.full((self.n_states,), -1, dtype=torch.int64)
        if self.prompt in self.user_messages:
            last[0] = self.user_messages.index(self.prompt)
        for child, (_, _, user_message) in self._parents.items():
            last[child] = user_message
        return last

    def messages_of(self, state: int) -> list[Message]:
        """A dialogue that is in state ``state`` (the first in reply / user-message order).

        With ``memory="dialogue"`` it is the only one, the inverse of :meth:`state_index`.

        Raises:
            ValueError: ``state`` outside 0..n_states-1.
        """
        if not 0 <= state < self.n_states:
            raise ValueError(f"state must be in 0..{self.n_states - 1}, got {state}")
        steps = []
        while state != 0:
            state, reply, user_message = self._parents[state]
            steps.append((reply, user_message))
        messages: list[Message] = [{"role": "user", "content": self.prompt}]
        for reply, user_message in reversed(steps):
            messages.append({"role": "assistant", "content": self.replies[reply]})
            messages.append({"role": "user", "content": self.user_messages[user_message]})
        return messages

    @classmethod
    def clarify_first(
        cls,
        reward_no_details: Sequence[float] = (0.3, 0.45, 0.1),
        reward_details: Sequence[float] = (0.6, 1.0, 0.4),
        details_after_clarify: Sequence[float] = (0.9, 0.3),
        details_kept: Sequence[float] = (0.8, 0.8, 0.5),
        details_volunteered: Sequence[float] = (0.3, 0.1, 0.1),
        max_horizon: int = 3,
        memory: str = "last_message",
    ) -> TabularDialogueMDP:
        """The default MDP: asking a clarifying question first looks worse now and pays later.

        Replies: ``a0`` asks a clarifying question, ``a1`` answers, ``a2`` is a generic reply. User
        messages: ``u0`` is a request without details (also the prompt), ``u1`` one with the details.
        The reward of a dialogue of h turns depends on its last exchange (u_h, a_h):
        ``reward_no_details[a]`` after ``u0`` and ``reward_details[a]`` after ``u1``; so at turn 1 the
        answer ``a1`` beats the question ``a0`` (0.45 against 0.3), but only an answer after the details
        scores 1.0. The user gives details (``u1``) with probability

        - ``details_after_clarify[0]`` after ``a0`` at turn 1, ``details_after_clarify[1]`` after ``a0``
          at a later turn from ``u0`` (a late question is answered less often); after ``a0`` from
          ``u1`` with ``details_kept[0]``;
        - ``details_kept[a]`` after ``a1`` / ``a2`` when the last user message had the details;
        - ``details_volunteered[a]`` after ``a1`` / ``a2`` when it had none.

        So the turn-1 question ``a0`` pays at turns 2 and 3, which a last-turn (myopic) learner misses:
        the optimal policy asks at turn 1 and answers afterwards (per-turn values 0.300 / 0.945 / 0.852),
        the myopic one always answers (0.450 / 0.505 / 0.544). From the uniform policy REFUEL's first
        step already favours the question (Q = 0.432 against 0.400 at s_1); from a policy that rarely
        asks and mostly gives the generic reply the later turns must improve first. Everything depends
        on the dialogue only through (h, u_h), so ``memory="last_message"`` (the default, 5 states) is
        exact; ``memory="dialogue"`` gives the same MDP on the 43-state tree.
        """
        replies, users = len(REPLIES), len(USER_MESSAGES)
        offsets, children = _geometry(max_horizon, replies, users, memory)
        last_user = torch.zeros(offsets[-1], dtype=torch.int64)  # u_h of every state; the prompt is u0
        last_user[children.reshape(-1)] = torch.arange(users).repeat(offsets[-2] * replies)
        table = torch.tensor([reward_no_details, reward_details], dtype=DTYPE)  # [U, A]
        rewards = torch.empty(offsets[-1], replies, dtype=DTYPE)
        user_probs = torch.empty(offsets[-2], replies, users, dtype=DTYPE)
        for turn in range(1, max_horizon + 1):
            for state in range(offsets[turn - 1], offsets[turn]):
                last = int(last_user[state])
                rewards[state] = table[last]
                if turn == max_horizon:
                    continue
                for reply in range(replies):
                    if last == 1:
                        details = details_kept[reply]
                    elif reply == 0:
                        details = details_after_clarify[0 if turn == 1 else 1]
                    else:
                        details = details_volunteered[reply]
                    user_probs[state, reply] = torch.tensor([1.0 - details, details], dtype=DTYPE)
        return cls(user_probs, rewards, max_horizon, memory, name=f"clarify-first-{memory}")

    @classmethod
    def random(
        cls, seed: int, max_horizon: int = 3, n_replies: int = 3, n_user_messages: int = 2, memory: str = "dialogue"
    ) -> TabularDialogueMDP:
        """A random MDP (seeded): Dirichlet(1) user tables and Uniform[0, 1) rewards for every state."""
        generator = torch.Generator().manual_seed(seed)
        replies = tuple(f"a{i}" for i in range(n_replies))
        users = tuple(f"u{i}" for i in range(n_user_messages))
        offsets, _ = _geometry(max_horizon, n_replies, n_user_messages, memory)
        n_states, n_inner = offsets[-1], offsets[-2]
        gamma = -torch.log(torch.rand(n_inner, n_replies, n_user_messages, generator=generator, dtype=DTYPE))
        user_probs = gamma / gamma.sum(-1, keepdim=True)
        rewards = torch.rand(n_states, n_replies, generator=generator, dtype=DTYPE)
        return cls(user_probs, rewards, max_horizon, memory, replies, users, "u0", name=f"random-{seed}-{memory}")


def reference_logits(mdp: TabularDialogueMDP, probs: Sequence[float] = (0.05, 0.35, 0.6)) -> torch.Tensor:
    """Logits of the base policy π_0 = π_ref: the same reply probabilities at every state.

    The default prefers the generic reply and rarely asks a clarifying question, so the states after a
    turn-1 question are rarely visited by π_0.

    Returns:
        ``[n_states, n_replies]`` logits (nats).

    Raises:
        ValueError: ``probs`` is not a distribution over the replies with full support.
    """
    p = torch.as_tensor(probs, dtype=DTYPE)
    if p.shape != (mdp.n_replies,) or (p <= 0).any() or abs(float(p.sum()) - 1.0) > 1e-9:
        raise ValueError(f"probs must be {mdp.n_replies} positive probabilities summing to 1, got {list(probs)}")
    return p.log().expand(mdp.n_states, -1).clone()


# --- exact dynamic programming -------------------------------------------------------------------


def horizon_probs(config: EpisodeConfig) -> torch.Tensor:
    """P(H) of the simulator's episodes, ``[max_horizon]``: uniform on 1..max_horizon or a point mass."""
    probs = torch.zeros(config.max_horizon, dtype=DTYPE)
    if config.horizon is None:
        probs[:] = 1.0 / config.max_horizon
    else:
        probs[config.horizon - 1] = 1.0
    return probs


def stop_probs(horizon_distribution: torch.Tensor) -> torch.Tensor:
    """Per-turn stop probabilities c_h = P(H = h | H ≥ h) of a horizon distribution, ``[H_max]``.

    With them the Bellman equation of an episode whose horizon H is drawn from the distribution (and
    unseen by the policy) is Q(s_h, a) = c_h r(s_h, a) + (1 − c_h) Σ_u P(u | s_h, a) V(s_{h+1}).

    Raises:
        ValueError: not a distribution.
    """
    probs = torch.as_tensor(horizon_distribution, dtype=DTYPE)
    if probs.dim() != 1 or (probs < 0).any() or abs(float(probs.sum()) - 1.0) > 1e-9:
        raise ValueError(f"horizon_distribution must be a probability vector, got {probs.tolist()}")
    survival = probs.flip(0).cumsum(0).flip(0)  # P(H ≥ h)
    stops = torch.where(survival > 0, probs / survival.clamp_min(1e-300), torch.ones_like(probs))
    stops[-1] = 1.0
    return stops


def _check_policy(mdp: TabularDialogueMDP, policy: torch.Tensor, what: str = "policy") -> torch.Tensor:
    policy = torch.as_tensor(policy, dtype=DTYPE)
    if tuple(policy.shape) != (mdp.n_states, mdp.n_replies):
        raise ValueError(f"{what} must have shape [n_states, n_replies] = {(mdp.n_states, mdp.n_replies)}")
    if (policy < 0).any() or not torch.allclose(policy.sum(-1), torch.ones((), dtype=DTYPE), atol=1e-9):
        raise ValueError(f"{what} must hold probabilities summing to 1 per state (pass softmax(logits))")
    return policy


def _backup(mdp: TabularDialogueMDP, stops: torch.Tensor, state_value: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward induction; ``state_value(turn_slice, q_turn)`` turns Q of a turn into V of its states."""
    stops = torch.as_tensor(stops, dtype=DTYPE)
    if tuple(stops.shape) != (mdp.max_horizon,):
        raise ValueError(f"stop probabilities must have shape [max_horizon] = [{mdp.max_horizon}]")
    q = torch.zeros(mdp.n_states, mdp.n_replies, dtype=DTYPE)
    v = torch.zeros(mdp.n_states, dtype=DTYPE)
    for turn in range(mdp.max_horizon, 0, -1):
        here = mdp.turn_slice(turn)
        q_turn = stops[turn - 1] * mdp.rewards[here]  # [n_h, A]
        if turn < mdp.max_horizon:
            v_next = v[mdp.children[here]]  # [n_h, A, U]
            q_turn = q_turn + (1 - stops[turn - 1]) * (mdp.user_probs[here] * v_next).sum(-1)
        q[here] = q_turn
        v[here] = state_value(here, q_turn)
    return q, v


def q_values(mdp: TabularDialogueMDP, policy: torch.Tensor, stops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q^π and V^π of every state by backward induction.

    Args:
        policy: π(a | s), ``[n_states, n_replies]``.
        stops: per-turn stop probabilities ``[max_horizon]`` (:func:`stop_probs`); all ones gives the
            myopic Q(s_h, a) = r(s_h, a) of a dialogue that ends at turn h.

    Returns:
        ``Q [n_states, n_replies]`` and ``V [n_states]`` (reward units): the expected reward of the
        complete dialogue given the state (and the reply), π afterwards.
    """
    policy = _check_policy(mdp, policy)
    return _backup(mdp, stops, lambda here, q_turn: (policy[here] * q_turn).sum(-1))


def optimal_q_values(mdp: TabularDialogueMDP, stops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q* and V* of every state (``[n_states, n_replies]``, ``[n_states]``), see :func:`q_values`."""
    return _backup(mdp, stops, lambda here, q_turn: q_turn.max(-1).values)


def greedy_policy(q: torch.Tensor) -> torch.Tensor:
    """The deterministic policy argmax_a Q(s, a) (ties to the lowest index), ``[n_states, n_replies]``."""
    return torch.nn.functional.one_hot(q.argmax(-1), q.shape[-1]).to(DTYPE)


def kl_regularized_optimum(
    mdp: TabularDialogueMDP, ref_policy: torch.Tensor, beta: float, stops: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The optimum of the KL-regularised objective with a fixed reference, by soft backward induction.

    J_β(π) = E_π[r(τ)] − (1/β) E_π[Σ_{h ≤ H} KL(π(·|s_h) ‖ π_ref(·|s_h))] (the KL summed over the turns
    played) is maximised by π*_β(a|s) ∝ π_ref(a|s) exp(β Q_β(s, a)) with
    Q_β(s_h, a) = c_h r + (1 − c_h) E_u[V_β(s_{h+1})] and V_β(s) = (1/β) ln Σ_a π_ref(a|s) exp(β Q_β(s, a)).
    As β → ∞ it tends to the unregularised optimum V*, which is also the fixed point of the
    mirror-descent iteration π_{t+1} ∝ π_t exp(η Q^{π_t}) (whose KL anchor moves with t).

    Args:
        ref_policy: π_ref, ``[n_states, n_replies]`` with full support.
        beta: β > 0 (per reward unit; 1/β is the KL weight in reward units per nat).
        stops: per-turn stop probabilities ``[max_horizon]``.

    Returns:
        π*_β ``[n_states, n_replies]`` and J_β(π*_β) from the start state (reward units).

    Raises:
        ValueError: β ≤ 0 or a reference without full support.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    ref_policy = _check_policy(mdp, ref_policy, "ref_policy")
    if (ref_policy <= 0).any():
        raise ValueError("ref_policy must give every reply positive probability")
    log_ref = ref_policy.log()
    q, v = _backup(mdp, stops, lambda here, q_turn: torch.logsumexp(log_ref[here] + beta * q_turn, -1) / beta)
    return torch.softmax(log_ref + beta * q, -1), float(v[0])


def regularized_value(
    mdp: TabularDialogueMDP, policy: torch.Tensor, ref_policy: torch.Tensor, beta: float, stops: torch.Tensor
) -> float:
    """J_β(π) of :func:`kl_regularized_optimum` for any policy (reward units)."""
    policy = _check_policy(mdp, policy)
    log_ref = _check_policy(mdp, ref_policy, "ref_policy").log()
    kl = (policy * (policy.clamp_min(1e-300).log() - log_ref)).sum(-1)  # [n_states] nats
    _, v = _backup(mdp, stops, lambda here, q_turn: (policy[here] * q_turn).sum(-1) - kl[here] / beta)
    return float(v[0])


def state_distribution(mdp: TabularDialogueMDP, policy: torch.Tensor) -> torch.Tensor:
    """d^π(s): probability that a dialogue played by π reaches state s, ``[n_states]``.

    Within each turn it sums to 1 (the roll-in distribution d^π_h of episodes that last at least h turns).
    """
    policy = _check_policy(mdp, policy)
    reach = torch.zeros(mdp.n_states, dtype=DTYPE)
    reach[0] = 1.0
    for turn in range(1, mdp.max_horizon):
        here = mdp.turn_slice(turn)
        flow = reach[here, None, None] * policy[here, :, None] * mdp.user_probs[here]  # [n_h, A, U]
        reach.index_add_(0, mdp.children[here].reshape(-1), flow.reshape(-1))
    return reach


def turn_values(mdp: TabularDialogueMDP, policy: torch.Tensor) -> torch.Tensor:
    """V_h(π) = E_π[r(τ_{1:h})], the expected reward of π's dialogue ended after turn h, ``[max_horizon]``.

    This is what "value at turn h" means here: the tabular counterpart of judging π's turn-h reply in
    π's own dialogue (the paper's per-turn evaluation).
    """
    policy = _check_policy(mdp, policy)
    reach = state_distribution(mdp, policy)
    per_state = reach * (policy * mdp.rewards).sum(-1)  # [n_states]
    return torch.stack([per_state[mdp.turn_slice(turn)].sum() for turn in range(1, mdp.max_horizon + 1)])


def policy_value(mdp: TabularDialogueMDP, policy: torch.Tensor, horizon_distribution: torch.Tensor) -> float:
    """Expected episode reward Σ_h P(H = h) V_h(π) (reward units), e.g. ``horizon_probs(config)``."""
    weights = torch.as_tensor(horizon_distribution, dtype=DTYPE)
    return float((weights * turn_values(mdp, policy)).sum())


def turn_win_rates(mdp: TabularDialogueMDP, policy: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Exact per-turn win rate of π against a baseline, ``[max_horizon]`` in [0, 1].

    W_h = P(r(τ_{1:h}) > r(τ'_{1:h})) + ½ P(r(τ_{1:h}) = r(τ'_{1:h})) for independent dialogues τ ~ π,
    τ' ~ baseline (each with its own user draws), ended after turn h: the tabular counterpart of the
    paper's per-turn win rate with a perfect judge of the reward.
    """
    policy, baseline = _check_policy(mdp, policy), _check_policy(mdp, baseline, "baseline")
    mass, mass_base = (
        state_distribution(mdp, p)[:, None] * p for p in (policy, baseline)
    )  # [n_states, A] P(dialogue ends with (s, a)) per turn
    rates = []
    for turn in range(1, mdp.max_horizon + 1):
        here = mdp.turn_slice(turn)
        value = mdp.rewards[here].reshape(-1)  # [n_h · A]
        compare = (value[:, None] > value[None, :]).to(DTYPE) + 0.5 * (value[:, None] == value[None, :]).to(DTYPE)
        rates.append(mass[here].reshape(-1) @ compare @ mass_base[here].reshape(-1))
    return torch.stack(rates)


# --- the pieces the simulator needs ----------------------------------------------------------------


class TabularPolicy:
    """A softmax-table policy as a :class:`~dialogsim.backends.base.ChatBackend`.

    π(a | s) = softmax(logits[s] / temperature)[a], with the state s read from the conversation's
    messages (:meth:`TabularDialogueMDP.state_index`). One ``chat`` call samples the whole batch from one
    ``torch.Generator`` seeded with ``sampling.seed``; temperature 0 is greedy.

    Args:
        mdp: the MDP whose states index the table.
        logits: ``[n_states, n_replies]`` (nats); default 0 (uniform). Copied.
        name: the backend's name.

    Attributes:
        logits: the table, float64, updated in place by training.
    """

    def __init__(
        self, mdp: TabularDialogueMDP, logits: torch.Tensor | None = None, name: str = "tabular-policy"
    ) -> None:
        self.mdp, self.name = mdp, name
        shape = (mdp.n_states, mdp.n_replies)
        self.logits = (
            torch.zeros(shape, dtype=DTYPE) if logits is None else torch.as_tensor(logits, dtype=DTYPE).clone()
        )
        if tuple(self.logits.shape) != shape:
            raise ValueError(f"logits must have shape [n_states, n_replies] = {shape}, got {tuple(self.logits.shape)}")
        self.tokenizer = TabularTokenizer(mdp)

    def probs(self, temperature: float = 1.0) -> torch.Tensor:
        """π as probabilities ``[n_states, n_replies]`` at ``temperature`` (> 0)."""
        return torch.softmax(self.logits / temperature, -1)

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        """One reply per conversation (each ending with a user message of the MDP).

        Raises:
            TabularDialogueError: a conversation is not a state of the MDP.
            ValueError: ``sampling.top_p`` < 1 (the table samples the full softmax).
        """
        if sampling.top_p != 1.0:
            raise ValueError(f"TabularPolicy samples the full softmax; set top_p=1.0 (got {sampling.top_p})")
        if not conversations:
            return []
        states = torch.tensor([self.mdp.state_index(messages) for messages in conversations])
        logits = self.logits[states]  # [B, A]
        if sampling.temperature == 0:
            replies = logits.argmax(-1)
            logprobs = torch.zeros(len(states), dtype=DTYPE)
        else:
            log_probs = torch.log_softmax(logits / sampling.temperature, -1)  # [B, A]
            generator = torch.Generator()
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
            replies = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)  # [B]
            logprobs = log_probs.gather(1, replies[:, None]).squeeze(1)
        completions = []
        for messages, reply, logprob in zip(conversations, replies.tolist(), logprobs.tolist(), strict=True):
            completions.append(
                Completion(
                    text=self.mdp.replies[reply],
                    token_ids=(self.tokenizer.token_id(self.mdp.replies[reply]),),
                    prompt_token_ids=tuple(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)),
                    finish_reason="stop",
                    logprobs=(logprob,),
                )
            )
        return completions


class TabularUser:
    """The simulated user of the tabular MDP, usable as a :class:`~dialogsim.simulator.DialogueSimulator` user.

    The next user message is drawn from ``mdp.user_probs[s_h, a_h]`` (one ``torch.Generator`` per
    dialogue, seeded with its seed). The user is its own backend: :attr:`name` (the tables' fingerprint) enters
    the simulator's config fingerprint, so snapshots do not cross MDPs.

    Attributes:
        backend: ``self``.
        template: a :class:`~dialogsim.user.UserTemplate` named ``"tabular"`` (no prompt is rendered).
        sampling: temperature 1, one token.
        stats: ``parsed`` count (every tabular user turn is parsed).
    """

    def __init__(self, mdp: TabularDialogueMDP) -> None:
        self.mdp = mdp
        self.name = f"tabular-user:{mdp.model_name}"
        self.backend = self
        self.sampling = SamplingParams(temperature=1.0, max_new_tokens=1)
        self.template = UserTemplate(
            name="tabular",
            system=None,
            header="",
            footer="",
            user_label="",
            assistant_label="",
            answer_marker=None,
            sampling=self.sampling,
        )
        self.stats: Counter[str] = Counter()

    def next_questions(
        self, dialogues: list[list[Message]], seed: int | None = None, *, seeds: Sequence[int] | None = None
    ) -> list[UserTurn]:
        """The next user message of each dialogue (ending with an assistant reply), one generator per dialogue.

        Dialogue i's generator is seeded ``seeds[i]``, else :func:`~dialogsim.sampling.request_seed`
        (``seed``, i), else from fresh entropy (see :meth:`dialogsim.user.UserSimulator.next_questions`).

        Raises:
            TabularDialogueError: a dialogue is not the MDP's, or it is already at the last turn.
            ValueError: both ``seed`` and ``seeds``, or not one seed per dialogue.
        """
        if seed is not None and seeds is not None:
            raise ValueError("next_questions takes seed (one for the call) or seeds (one per dialogue), not both")
        sampling = self.sampling.with_seed(seed) if seeds is None else self.sampling.with_seeds(seeds)
        row_seeds = sampling.conversation_seeds(len(dialogues)) or [None] * len(dialogues)
        draws = []
        for dialogue, row_seed in zip(dialogues, row_seeds, strict=True):
            state = self.mdp.state_index(dialogue[:-1])
            if int(self.mdp.state_turns[state]) >= self.mdp.max_horizon:
                raise TabularDialogueError(f"dialogue is at the last turn {self.mdp.max_horizon}; the user has no move")
            reply = self.mdp.reply_index(dialogue[-1]["content"], where=f"message {len(dialogue) - 1}")
            generator = torch.Generator()
            if row_seed is None:
                generator.seed()
            else:
                generator.manual_seed(row_seed)
            draws.append(int(torch.multinomial(self.mdp.user_probs[state, reply], 1, generator=generator)))
        self.stats["parsed"] += len(draws)
        return [UserTurn(text=self.mdp.user_messages[u], parsed=True) for u in draws]


class TabularReward:
    """The reward model of the tabular MDP: ``mdp.rewards[s_h, a_h]`` of a complete h-turn dialogue.

    A dialogue that is not the MDP's gets NaN, counted under ``failures["not_a_tabular_dialogue"]``.
    """

    def __init__(self, mdp: TabularDialogueMDP) -> None:
        self.mdp = mdp
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per complete dialogue (ending with an assistant reply)."""
        check_batch(dialogues, rows, "TabularReward")
        scores = []
        for dialogue in dialogues:
            try:
                state = self.mdp.state_index(dialogue[:-1])
                if dialogue[-1].get("role") != "assistant":
                    raise TabularDialogueError("the last message must be the assistant reply")
                reply = self.mdp.reply_index(dialogue[-1]["content"])
            except TabularDialogueError:
                self.failures["not_a_tabular_dialogue"] += 1
                scores.append(float("nan"))
                continue
            scores.append(float(self.mdp.rewards[state, reply]))
        return scores


class TabularTokenizer:
    """The minimal tokenizer the simulator and the pair tokeniser need: one token per role and per text.

    ``apply_chat_template`` renders each message as ``[role token, content token]`` (plus the assistant
    role token with ``add_generation_prompt``), which is all ``DialogueSimulator.count_tokens`` and
    ``refuel.pairs.tokenize_pair`` call.
    """

    ROLES: ClassVar[tuple[str, ...]] = ("<|system|>", "<|user|>", "<|assistant|>")

    def __init__(self, mdp: TabularDialogueMDP) -> None:
        texts = [mdp.prompt, *mdp.user_messages, *mdp.replies]
        self.vocab = {token: i for i, token in enumerate(dict.fromkeys([*self.ROLES, *texts]))}
        self.inverse = {i: token for token, i in self.vocab.items()}
        self.name_or_path = f"tabular:{mdp.model_name}"

    def __len__(self) -> int:
        return len(self.vocab)

    def token_id(self, text: str) -> int:
        """The id of a role token or of one message text.

        Raises:
            TabularDialogueError: unknown text.
        """
        if text not in self.vocab:
            raise TabularDialogueError(f"{text!r:.40} is not in the tabular vocabulary {sorted(self.vocab)}")
        return self.vocab[text]

    def apply_chat_template(
        self,
        conversation: Sequence[Message],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> list[int] | str:
        """Token ids (or, with ``tokenize=False``, the text) of the chat-templated conversation.

        Raises:
            ValueError: ``return_dict=True`` (not supported).
            TabularDialogueError: unknown role or text.
        """
        if return_dict:
            raise ValueError("TabularTokenizer.apply_chat_template supports return_dict=False only")
        ids = []
        for message in conversation:
            ids += [self.token_id(f"<|{message['role']}|>"), self.token_id(message["content"])]
        if add_generation_prompt:
            ids.append(self.vocab["<|assistant|>"])
        return ids if tokenize else " ".join(self.inverse[i] for i in ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """The text of ``token_ids`` (space-joined; role tokens dropped with ``skip_special_tokens``)."""
        tokens = [self.inverse[int(i)] for i in token_ids]
        return " ".join(t for t in tokens if not (skip_special_tokens and t in self.ROLES))


def build_tabular_simulator(
    mdp: TabularDialogueMDP | None = None, horizon: int | None = None, max_dialogue_tokens: int = 2048
) -> DialogueSimulator:
    """A :class:`~dialogsim.simulator.DialogueSimulator` on the tabular MDP.

    Args:
        mdp: default :meth:`TabularDialogueMDP.clarify_first`.
        horizon: fixed H, or ``None`` for H ~ U{1..max_horizon} per episode (the REFUEL public code's
            choice, and what makes last-turn baselines train every turn index).
        max_dialogue_tokens: token budget (each message is 2 tokens, so the default never truncates).
    """
    mdp = mdp if mdp is not None else TabularDialogueMDP.clarify_first()
    row = PromptRow(id=PROMPT_ID, task="Tabular", dataset="tabular", instruction=mdp.prompt)
    config = EpisodeConfig(max_horizon=mdp.max_horizon, horizon=horizon, max_dialogue_tokens=max_dialogue_tokens)
    return DialogueSimulator([row], TabularUser(mdp), TabularReward(mdp), config, TabularTokenizer(mdp))


# --- Gymnasium environments ----------------------------------------------------------------------


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
