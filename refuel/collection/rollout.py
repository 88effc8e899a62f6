"""Run a policy against the simulated user: roll-ins to turn h and roll-outs to the horizon."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.dialogue import DialogueState
from dialogsim.messages import Message
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator

logger = logging.getLogger(__name__)


def draw_seed(rng: np.random.Generator) -> int:
    """A 31-bit seed for one backend call."""
    return int(rng.integers(2**31 - 1))


@dataclass
class PolicyRun:
    """One policy's dialogues in a joint run (:func:`run_policies`).

    Attributes:
        policy: the policy's engine.
        states: its dialogues, updated in place.
        rng: source of its per-call sampling seeds (one draw per call, as if it ran alone).
        until_turn: per state, stop once the dialogue reaches s_h with h = this turn (roll-in); ``None``
            runs every state to the end of its episode (roll-out).
    """

    policy: ChatBackend
    states: list[DialogueState]
    rng: np.random.Generator
    until_turn: list[int] | None = None

    def _pending(self) -> list[tuple[DialogueState, int]]:
        """The states that still take a turn, each with the turn it stops before."""
        targets = self.until_turn if self.until_turn is not None else [state.horizon + 1 for state in self.states]
        return [
            (state, target)
            for state, target in zip(self.states, targets, strict=True)
            if not state.done and state.turn < target
        ]

    def active(self) -> list[DialogueState]:
        """The states that still take a turn."""
        return [state for state, _ in self._pending()]

    def remaining_turns(self) -> int:
        """The policy replies its states still take if none ends early (the unit of the progress bar)."""
        return sum(target - state.turn for state, target in self._pending())


@dataclass(frozen=True)
class PolicyCall:
    """One batched policy call of a round: ``policy`` replies to each of ``conversations``, with a sampling seed
    drawn from ``rng`` (one draw per call)."""

    policy: ChatBackend
    conversations: list[list[Message]]
    rng: np.random.Generator


def policy_turn(calls: Sequence[PolicyCall], sampling: SamplingParams, progress: tqdm) -> list[list[Completion]]:
    """The policy half of one round, shared by collection (:func:`refuel.collection.collect.collect_pairs`) and
    evaluation (:func:`run_policies`): each call in order draws its seed and makes one batched
    :meth:`~dialogsim.backends.base.ChatBackend.chat`; ``progress`` advances by the replies (turns).

    Returns:
        Per call, its completions in the order of its conversations. The other half of the round, the simulated
        user's turns and the reward, is one step of the simulator (evaluation) or of the vector env (collection).
    """
    completions = []
    for call in calls:
        completions.append(call.policy.chat(call.conversations, sampling.with_seed(draw_seed(call.rng))))
        progress.update(len(call.conversations))
    return completions


def run_policies(simulator: DialogueSimulator, runs: list[PolicyRun], sampling: SamplingParams) -> None:
    """Advance several policies' dialogues together: per round one call per policy, then ONE simulator step.

    The simulated user's turns of every policy's dialogues are one batched user call per round. A
    policy's dialogues are those it would have alone: each state draws its user seeds from its own RNG
    (:meth:`~dialogsim.simulator.DialogueSimulator.step`) and each policy its call seeds from ``run.rng``,
    up to the engines' batched numerics.

    States are updated in place: ``state.done`` tells which ended, ``state.truncated`` which ended
    on the token budget before the horizon, and ``state.final_reward`` holds the horizon reward. A progress bar
    counts the policy replies (turns) of every run, with their rate.
    """
    progress = tqdm(total=sum(run.remaining_turns() for run in runs), desc="dialogue turns", unit="turn")
    while True:
        started = time.perf_counter()
        actives = [(run, active) for run in runs if (active := run.active())]
        if not actives:
            progress.close()
            return
        calls = [PolicyCall(run.policy, [state.messages for state in active], run.rng) for run, active in actives]
        states = [state for _, active in actives for state in active]
        replies = [reply for completions in policy_turn(calls, sampling, progress) for reply in completions]
        simulator.step(states, [reply.text for reply in replies])
        logger.info(
            "%d dialogues of %d policies advanced one turn (%d policy tokens) in %.1f s",
            len(states),
            len(runs),
            sum(len(reply.token_ids) for reply in replies),
            time.perf_counter() - started,
        )


def run_policy(
    simulator: DialogueSimulator,
    policy: ChatBackend,
    states: list[DialogueState],
    sampling: SamplingParams,
    rng: np.random.Generator,
    until_turn: list[int] | None = None,
) -> None:
    """Alternate one policy's replies and simulated-user turns, one batched call each per round.

    The one-policy case of :func:`run_policies` (see :class:`PolicyRun` for ``until_turn``).
    """
    run_policies(simulator, [PolicyRun(policy, states, rng, until_turn)], sampling)
