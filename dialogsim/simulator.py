"""The conversation simulator shared by the single and the vectorized environment.

It owns the prompt table, the simulated user, the reward model and the episode rules (horizon,
token budget, when the reward comes) and advances a batch of dialogues with one user-model call
and one reward-model call per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from dialogsim.dialogue import DialogueState, SnapshotError, fingerprint
from dialogsim.messages import Message, count_turns, validate_messages
from dialogsim.prompts import PromptRow, instruction_key
from dialogsim.rewards.base import RewardModel
from dialogsim.sampling import SEED_LIMIT
from dialogsim.settings import AT_LEAST_ONE, HORIZON, Rule, check_settings, setting
from dialogsim.user import SimulatedUser

EPISODE_RULES = (
    Rule(
        ("horizon", "max_horizon"),
        lambda c: c.horizon is None or c.horizon <= c.max_horizon,
        "at most max_horizon, or None to draw H from 1..max_horizon",
    ),
)


@dataclass(frozen=True)
class EpisodeConfig:
    """Episode rules (fields declared with :func:`~dialogsim.settings.setting`: default, range, help).

    Attributes:
        max_horizon: largest horizon H (≤ 5 as in the paper).
        horizon: fixed H, or ``None`` to draw H uniformly from 1..max_horizon at each reset (the
            REFUEL public code's choice).
        max_dialogue_tokens: budget for the whole chat-templated dialogue (policy tokenizer, tokens);
            past it the episode is truncated.
        reward_per_turn: score the dialogue after every assistant reply, not only at the horizon.

    Raises:
        UsageError: (a ``ValueError``) a field of the wrong type or out of range, e.g. ``max_horizon=7 (valid: an
            integer ≥ 1 and ≤ 5)``, or ``horizon`` above ``max_horizon``.
    """

    max_horizon: int = setting(
        3, help="H is drawn uniformly from 1..max_horizon (paper: 5)", shapes="dialogues", valid=HORIZON
    )
    horizon: int | None = setting(
        None, help="fixed H, or unset to draw it from 1..max_horizon per episode", shapes="dialogues", valid=HORIZON
    )
    max_dialogue_tokens: int = setting(
        2048, help="dialogue token budget; past it the episode is truncated", shapes="dialogues", valid=AT_LEAST_ONE
    )
    reward_per_turn: bool = setting(
        False, help="score the dialogue after every assistant reply, not only at the horizon", shapes="pairs"
    )

    def __post_init__(self) -> None:
        check_settings(self, EPISODE_RULES)


@dataclass
class StepOutcome:
    """What one dialogue got from a step: reward (at the horizon, else 0), end flags and info."""

    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = field(default_factory=dict)


class DialogueSimulator:
    """Starts, restores and advances dialogues.

    Args:
        prompts: the prompt rows episodes start from (ids must be unique).
        user: the simulated user (an LLM's :class:`~dialogsim.user.UserSimulator`, or the scripted turns of
            :class:`~dialogsim.user.ReplayedUser`).
        reward: the reward model.
        config: episode rules.
        tokenizer: the policy's tokenizer, used to count dialogue tokens against the budget.

    Raises:
        ValueError: no prompts, or duplicate prompt ids.
    """

    def __init__(
        self,
        prompts: list[PromptRow],
        user: SimulatedUser,
        reward: RewardModel,
        config: EpisodeConfig,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        if not prompts:
            raise ValueError("the environment needs at least one prompt row")
        self.prompts = {row.id: row for row in prompts}
        if len(self.prompts) != len(prompts):
            raise ValueError("prompt ids must be unique; deduplicate the rows (dialogsim.data.load_prompts does)")
        self.prompt_ids = [row.id for row in prompts]
        self.user, self.reward, self.config, self.tokenizer = user, reward, config, tokenizer
        self.fingerprint = fingerprint(
            {
                "prompts": fingerprint({"ids": self.prompt_ids}),
                "user_model": getattr(user.backend, "name", type(user.backend).__name__),
                "user_template": user.template.name,
                "user_sampling": asdict(user.sampling),
                "reward": type(reward).__name__,
                "episode": asdict(config),
            }
        )

    def new_state(self, rng: np.random.Generator, options: dict[str, Any] | None = None) -> DialogueState:
        """Start a dialogue: the prompt's instruction is the first user message (state s_1), or a given prefix.

        ``options`` may hold ``prompt_id`` (else drawn uniformly), ``horizon`` (else the config's) and
        ``prefix``: a dialogue s_k to start from instead of s_1 (e.g. an offline dialogue's first k user
        messages, see :class:`dialogsim.prompts.OfflineDialogue`): an optional system message, then
        alternating user / assistant messages ending with a user message, whose first user message is
        the prompt's instruction (up to :func:`~dialogsim.prompts.instruction_key`). It needs
        ``prompt_id`` (the row whose reference scores the dialogue); the episode goes on at turn
        h = k, and without ``horizon`` H is drawn uniformly from k..max_horizon. The user RNG is
        seeded from ``rng`` as for a fresh start.

        Raises:
            KeyError: unknown ``prompt_id``.
            ValueError: ``horizon`` outside 1..max_horizon; a ``prefix`` without ``prompt_id``, not a
                valid dialogue ending with a user message, of another prompt, or with more user
                messages than ``horizon``.
        """
        options = options or {}
        prefix = options.get("prefix")
        prompt_id = options.get("prompt_id")
        if prompt_id is None and prefix is not None:
            raise ValueError("options['prefix'] needs options['prompt_id']: the prompt row whose reference scores it")
        if prompt_id is None:
            prompt_id = self.prompt_ids[int(rng.integers(len(self.prompt_ids)))]
        elif prompt_id not in self.prompts:
            raise KeyError(f"unknown prompt_id {prompt_id!r}; it is not among the env's {len(self.prompts)} prompts")
        instruction = self.prompts[prompt_id].instruction
        messages = [{"role": "user", "content": instruction}] if prefix is None else _check_prefix(prefix, instruction)
        horizon = options.get("horizon", self.config.horizon)
        if horizon is None:
            horizon = int(rng.integers(count_turns(messages), self.config.max_horizon + 1))
        if not isinstance(horizon, int) or not count_turns(messages) <= horizon <= self.config.max_horizon:
            raise ValueError(
                f"options['horizon'] must be an int in {count_turns(messages)}..{self.config.max_horizon} "
                f"(the start has {count_turns(messages)} user messages), got {horizon!r}"
            )
        seed = int(rng.integers(2**63))
        return DialogueState(prompt_id, messages, horizon, np.random.Generator(np.random.PCG64(seed)))

    def restore(self, snapshot: Any) -> DialogueState:
        """A state from a snapshot (see :meth:`DialogueState.from_snapshot`), checked against this config.

        Raises:
            SnapshotError: a bad field (see :meth:`DialogueState.from_snapshot`), a prompt id this
                simulator does not have, or a first user message that is not that prompt row's instruction
                (up to :func:`~dialogsim.prompts.instruction_key`).
        """
        state = DialogueState.from_snapshot(snapshot, self.fingerprint, self.config.max_horizon)
        if state.prompt_id not in self.prompts:
            raise SnapshotError(f"snapshot['prompt_id'] {state.prompt_id!r} is not among this env's prompts")
        first_user = _other_first_user_message(state.messages, self.prompts[state.prompt_id].instruction)
        if first_user is not None:
            raise SnapshotError(
                f"snapshot['messages'] starts with the user message {first_user!r:.60}, which is not the instruction "
                f"of snapshot['prompt_id'] {state.prompt_id!r}; the snapshot was edited or belongs to another prompt"
            )
        return state

    def count_tokens(self, state: DialogueState) -> int:
        """Chat-templated token count of the dialogue with the policy's tokenizer (tokens)."""
        return len(self.tokenizer.apply_chat_template(state.messages, tokenize=True, return_dict=False))

    def step(self, states: list[DialogueState], replies: list[str]) -> list[StepOutcome]:
        """Append each reply as the assistant turn, then ask the user or score, in batched calls.

        Args:
            states: unfinished dialogues, each ending with a user message.
            replies: the policy's assistant reply for each.

        Returns:
            One :class:`StepOutcome` per state; states are updated in place, all of them or (when anything
            raises: the tokenizer, the reward model, the user's backend) none of them.

        Raises:
            RuntimeError: a state is already done.
        """
        for state in states:
            if state.done:
                raise RuntimeError(f"dialogue of prompt {state.prompt_id} has ended; reset it first")
        with _unchanged_on_error(states):
            for state, reply in zip(states, replies, strict=True):
                state.messages.append({"role": "assistant", "content": reply})
            tokens = [self.count_tokens(state) for state in states]
            outcomes = [
                StepOutcome(
                    reward=0.0,
                    terminated=state.turn >= state.horizon,
                    truncated=state.turn < state.horizon and n > self.config.max_dialogue_tokens,
                    info={"replied_turn": state.turn, "dialogue_tokens": n},
                )
                for state, n in zip(states, tokens, strict=True)
            ]
            self._score(states, outcomes)
            self._ask_user(states, outcomes)
        return outcomes

    def _score(self, states: list[DialogueState], outcomes: list[StepOutcome]) -> None:
        chosen = [
            i
            for i, outcome in enumerate(outcomes)
            if outcome.terminated or outcome.truncated or self.config.reward_per_turn
        ]
        rewards = self.reward.score(
            [states[i].messages for i in chosen], [self.prompts[states[i].prompt_id] for i in chosen]
        )
        for i, reward in zip(chosen, rewards, strict=True):
            outcomes[i].reward = float(reward)

    def _ask_user(self, states: list[DialogueState], outcomes: list[StepOutcome]) -> None:
        going_on = [i for i, outcome in enumerate(outcomes) if not (outcome.terminated or outcome.truncated)]
        for i, outcome in enumerate(outcomes):
            states[i].done = i not in going_on
            if states[i].done:
                states[i].final_reward = outcome.reward
        # One backend call serves the batch, but each dialogue's user turn is sampled with its own seed,
        # drawn from its own RNG: the next user message depends only on the dialogue and its RNG state,
        # whatever else is in the batch. Two branches restored from one snapshot thus draw common random
        # numbers, which takes the user's sampling noise out of r − r'.
        seeds = [int(states[i].rng.integers(SEED_LIMIT)) for i in going_on]
        rows = [self.prompts[states[i].prompt_id] for i in going_on]
        turns = self.user.next_questions([states[i].messages for i in going_on], seeds=seeds, rows=rows)
        for i, user_turn in zip(going_on, turns, strict=True):
            states[i].messages.append({"role": "user", "content": user_turn.text})
            outcomes[i].info["user_parsed"] = user_turn.parsed


@contextmanager
def _unchanged_on_error(states: list[DialogueState]) -> Iterator[None]:
    """On an exception in the block, put each state's messages, RNG, ``done`` and reward back, then re-raise.

    A step only appends messages, draws from each state's RNG and sets ``done`` / ``final_reward``, so
    the message count, the RNG state and those two fields are all there is to restore.
    """
    saved = [(len(s.messages), s.rng.bit_generator.state, s.done, s.final_reward) for s in states]
    try:
        yield
    except BaseException:
        for state, (length, rng_state, done, final_reward) in zip(states, saved, strict=True):
            del state.messages[length:]
            state.rng.bit_generator.state = rng_state
            state.done, state.final_reward = done, final_reward
        raise


def _other_first_user_message(messages: list[Message], instruction: str) -> str | None:
    """The first user message of ``messages`` if it is not ``instruction`` (up to ``instruction_key``), else None."""
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    return None if instruction_key(first_user) == instruction_key(instruction) else first_user


def _check_prefix(prefix: Any, instruction: str) -> list[Message]:
    """A copy of a start prefix s_k, checked (see :meth:`DialogueSimulator.new_state`).

    Raises:
        ValueError: (a :class:`~dialogsim.messages.MessageFormatError` for the format) naming the problem.
    """
    messages = validate_messages(prefix, where="options['prefix']")
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("options['prefix'] must end with a user message (the state s_k the policy answers)")
    first_user = _other_first_user_message(messages, instruction)
    if first_user is not None:
        raise ValueError(
            f"options['prefix'] starts with the user message {first_user!r:.60}, which is not the instruction "
            f"{instruction!r:.60} of options['prompt_id']; pair each prefix with its own prompt row"
        )
    return messages
