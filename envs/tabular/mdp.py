"""The tabular dialogue MDP: states read from a dialogue's messages, user and reward tables.

A state s_h is read from the dialogue up to and including the h-th user message: either the whole
dialogue (``memory="dialogue"``: a tree of 1 + 6 + 36 = 43 states for three replies, two user messages
and ``max_horizon = 3``) or the turn and the last user message (``memory="last_message"``: 5 states,
exact for the default :meth:`TabularDialogueMDP.clarify_first`, whose user and reward look no further).

The table-backed policy, user, reward model and tokenizer that run it behind a
:class:`~dialogsim.simulator.DialogueSimulator` are in :mod:`envs.tabular.simulator`, its Gymnasium
environments in :mod:`envs.tabular.env`, and its exact dynamic programming in
:mod:`refuel.tabular.dynamic_programming`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from dialogsim.messages import Message

REPLIES = ("a0", "a1", "a2")
USER_MESSAGES = ("u0", "u1")
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
