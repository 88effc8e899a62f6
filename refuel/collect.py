"""REFUEL pair collection: roll-in with π_t to turn h, reset, two replies, roll-outs, rewards.

Follows the REFUEL public code (DESIGN.md §4): the horizon H is drawn uniformly from
1..max_horizon (by the simulator), the reset turn h uniformly from 1..H; both dialogues share the
state s_h and differ from the turn-h reply on; both are scored at the horizon.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.dialogue import DialogueState
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator
from refuel.rollout import advance, run_policy

DROP_REASONS = ("identical_replies", "truncated", "invalid_reward")


@dataclass
class CollectionResult:
    """Collected pairs and the count of dropped pairs by reason.

    Drop reasons: ``identical_replies`` (y = y'), ``truncated`` (a dialogue exceeded the token
    budget), ``invalid_reward`` (r or r' is NaN).
    """

    pairs: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(DROP_REASONS, 0)))


def _start_states(
    simulator: DialogueSimulator, n_pairs: int, rng: np.random.Generator
) -> tuple[list[DialogueState], list[int]]:
    """One start state per pair (prompts without replacement, cycling) and its reset turn h."""
    order = rng.permutation(len(simulator.prompt_ids))
    states, turns = [], []
    for index in range(n_pairs):
        prompt_id = simulator.prompt_ids[int(order[index % len(order)])]
        state = simulator.new_state(rng, {"prompt_id": prompt_id})
        states.append(state)
        turns.append(int(rng.integers(1, state.horizon + 1)))
    return states, turns


def collect_pairs(
    simulator: DialogueSimulator,
    policy: ChatBackend,
    n_pairs: int,
    sampling: SamplingParams,
    seed: int,
    batch_size: int = 32,
) -> CollectionResult:
    """Collect up to ``n_pairs`` REFUEL pairs with the current policy π_t.

    Args:
        simulator: the conversation simulator (prompts, simulated user, reward, episode rules).
        policy: backend of π_t.
        n_pairs: number of reset points to try; dropped pairs are counted, not replaced.
        sampling: π_t's sampling settings (temperature is also used for the log-probabilities).
        seed: seeds prompt order, H, h and every backend call.
        batch_size: pairs advanced together (2 × batch_size dialogues in the roll-outs).

    Returns:
        The kept pairs as dicts (see :func:`pair_record`) and the drop counts.
    """
    rng = np.random.default_rng(seed)
    states, turns = _start_states(simulator, n_pairs, rng)
    result = CollectionResult()
    for start in tqdm(range(0, n_pairs, batch_size), desc="collect pairs", unit="batch"):
        batch = slice(start, start + batch_size)
        _collect_batch(simulator, policy, states[batch], turns[batch], sampling, rng, result)
    return result


def _collect_batch(
    simulator: DialogueSimulator,
    policy: ChatBackend,
    states: list[DialogueState],
    turns: list[int],
    sampling: SamplingParams,
    rng: np.random.Generator,
    result: CollectionResult,
) -> None:
    run_policy(simulator, policy, states, sampling, rng, until_turn=turns)  # roll-in to s_h
    reached = [i for i, state in enumerate(states) if not state.done]
    result.dropped["truncated"] += len(states) - len(reached)
    snapshots = [states[i].to_snapshot(simulator.fingerprint) for i in reached]
    branches = [simulator.restore(snapshot) for snapshot in snapshots for _ in range(2)]  # reset, [2P]
    replies = advance(simulator, policy, branches, sampling, rng)  # y, y' per pair, [2P]
    run_policy(simulator, policy, branches, sampling, rng)  # roll-outs to the horizon
    for k, snapshot in enumerate(snapshots):
        dialogues, completions = (branches[2 * k], branches[2 * k + 1]), (replies[2 * k], replies[2 * k + 1])
        reason = _drop_reason(dialogues, completions)
        if reason:
            result.dropped[reason] += 1
        else:
            result.pairs.append(pair_record(snapshot, dialogues, completions))


def _drop_reason(dialogues: tuple[DialogueState, DialogueState], replies: tuple[Completion, Completion]) -> str | None:
    if replies[0].text == replies[1].text:
        return "identical_replies"
    if any(dialogue.truncated for dialogue in dialogues):
        return "truncated"
    if any(np.isnan(dialogue.final_reward) for dialogue in dialogues):
        return "invalid_reward"
    return None


def pair_record(
    snapshot: dict[str, Any],
    dialogues: tuple[DialogueState, DialogueState],
    replies: tuple[Completion, Completion],
) -> dict[str, Any]:
    """One REFUEL pair as a flat, JSON/Arrow-friendly dict.

    Keys: ``prompt_id``, ``turn`` (h), ``horizon`` (H), ``snapshot_json`` (s_h), ``dialogue`` /
    ``dialogue_prime`` (complete messages), ``reward`` / ``reward_prime`` (r, r'), and for each turn-h
    reply the generated ``token_ids`` and the ``prompt_token_ids`` of s_h it was sampled from.
    """
    return {
        "prompt_id": snapshot["prompt_id"],
        "turn": snapshot["turn"],
        "horizon": snapshot["horizon"],
        "snapshot_json": json.dumps(snapshot),
        "dialogue": dialogues[0].messages,
        "dialogue_prime": dialogues[1].messages,
        "reward": dialogues[0].final_reward,
        "reward_prime": dialogues[1].final_reward,
        "prompt_token_ids": list(replies[0].prompt_token_ids),
        "token_ids": list(replies[0].token_ids),
        "token_ids_prime": list(replies[1].token_ids),
    }
