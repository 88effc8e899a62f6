"""Run a policy against the simulated user: roll-ins to turn h and roll-outs to the horizon."""

from __future__ import annotations

import logging
import time

import numpy as np

from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.dialogue import DialogueState
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator

logger = logging.getLogger(__name__)


def draw_seed(rng: np.random.Generator) -> int:
    """A 31-bit seed for one backend call."""
    return int(rng.integers(2**31 - 1))


def advance(
    simulator: DialogueSimulator,
    policy: ChatBackend,
    states: list[DialogueState],
    sampling: SamplingParams,
    rng: np.random.Generator,
) -> list[Completion]:
    """One turn for every state: policy replies from one seeded batched call, then one simulator step.

    Returns:
        The policy's completions, one per state (states are updated in place).
    """
    started = time.perf_counter()
    replies = policy.chat([state.messages for state in states], sampling.with_seed(draw_seed(rng)))
    simulator.step(states, [reply.text for reply in replies])
    logger.info(
        "%d dialogues advanced one turn (%d policy tokens) in %.1f s",
        len(states),
        sum(len(reply.token_ids) for reply in replies),
        time.perf_counter() - started,
    )
    return replies


def run_policy(
    simulator: DialogueSimulator,
    policy: ChatBackend,
    states: list[DialogueState],
    sampling: SamplingParams,
    rng: np.random.Generator,
    until_turn: list[int] | None = None,
) -> None:
    """Alternate policy replies and simulated-user turns, one batched call each per round.

    Args:
        until_turn: per state, stop once the dialogue reaches state s_h with h = this turn (roll-in);
            ``None`` runs every state to the end of its episode (roll-out).

    States are updated in place: ``state.done`` tells which ended, ``state.truncated`` which ended
    on the token budget before the horizon, and ``state.final_reward`` holds the horizon reward.
    """
    targets = until_turn if until_turn is not None else [state.horizon + 1 for state in states]
    while True:
        active = [states[i] for i, state in enumerate(states) if not state.done and state.turn < targets[i]]
        if not active:
            return
        advance(simulator, policy, active, sampling, rng)
