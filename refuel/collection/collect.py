"""REFUEL pair collection on the vector env: roll-in with π_t to turn h, reset, two replies, roll-outs.

Follows the REFUEL public code (Gao et al., 2025, arXiv 2410.04612): the horizon H is drawn uniformly from
1..max_horizon, the reset turn h uniformly from 1..H; both dialogues share the state s_h and differ
from the turn-h reply on; both are scored at the horizon.

A batch of P pairs runs on a :class:`~envs.vector_env.VectorDialogueEnv` of 2P conversations with
autoreset disabled: slots 0..P−1 roll in; when pair k reaches s_h, slots k and P+k are both reset to
its snapshot and from then on carry y and y'. Every round makes one policy call for all active
conversations (two when the roll-in policy differs from π_t), one user call and one reward call, so
roll-ins, both branches and all roll-outs of a batch share calls, and a batch needs max(H) rounds.

Where pairs start is decided by one :class:`~refuel.collection.resets.ResetDistribution`
(:mod:`refuel.collection.resets`): roll in with the current policy π_t (REFUEL); with the initial policy π_ref,
mixed with prompt starts (the PPO++ idea); or reset to prefixes of offline dialogues (the DR-PO idea); at
h ~ U{1..H}, or at h = H for the last-turn baselines. Every pair row records its ``reset_source``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode
from tqdm.auto import tqdm

from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.messages import Message
from dialogsim.prompts import OfflineDialogue
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator
from envs.vector_env import VectorDialogueEnv
from refuel.collection.resets import REFUEL_RESET, ResetDistribution, ResetPoint, plan_reset_points
from refuel.collection.rollout import PolicyCall, draw_seed, policy_turn, run_policy
from refuel.pairs import Pair

DROP_REASONS = ("identical_replies", "truncated", "invalid_reward")


@dataclass
class CollectionResult:
    """Collected pairs, the count of dropped pairs by reason and of reset points by source.

    Drop reasons: ``identical_replies`` (y = y'), ``truncated`` (a dialogue exceeded the token
    budget), ``invalid_reward`` (r or r' is NaN). ``sources`` counts the reset points tried (kept or
    dropped) per ``reset_source`` (see :func:`pair_record`).
    """

    pairs: list[Pair] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(DROP_REASONS, 0)))
    sources: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Branch:
    """One finished dialogue of a pair: its messages, horizon reward, truncation and turn-h reply."""

    messages: list[Message]
    reward: float
    truncated: bool
    reply: Completion


def collect_pairs(
    simulator: DialogueSimulator,
    policy: ChatBackend,
    n_pairs: int,
    sampling: SamplingParams,
    seed: int,
    batch_size: int = 32,
    reset: ResetDistribution = REFUEL_RESET,
    initial_policy: ChatBackend | None = None,
) -> CollectionResult:
    """Collect up to ``n_pairs`` REFUEL pairs with the current policy π_t, in memory.

    Args:
        simulator: the conversation simulator (prompts, simulated user, reward, episode rules).
        policy: backend of π_t (the turn-h replies y, y' and the roll-outs).
        n_pairs: number of reset points to try; dropped pairs are counted, not replaced.
        sampling: π_t's sampling settings (temperature is also used for the log-probabilities).
        seed: seeds prompt order, H, h, the reset mixture and every backend call.
        batch_size: pairs advanced together (2 × batch_size conversations in the vector env).
        reset: where pairs start and the reset turn rule (:class:`~refuel.collection.resets.ResetDistribution`); the
            default is REFUEL's (roll in with π_t, h ~ U{1..H}).
        initial_policy: backend of π_ref, the initial policy, that generates turns 1..h−1 when
            ``reset.rollin == "initial"`` (e.g. :meth:`~refuel.collection.resets.ResetDistribution.last_turn`, the
            last-turn baselines); ``None`` otherwise.

    Returns:
        The kept pairs (:class:`~refuel.pairs.Pair`, see :func:`pair_record`), the drop counts and the reset points per
        source, merged over the batches of :func:`iter_pair_batches`.

    Raises:
        ValueError: see :meth:`~refuel.collection.resets.ResetDistribution.check`.
    """
    result = CollectionResult()
    batches = iter_pair_batches(simulator, policy, n_pairs, sampling, seed, batch_size, reset, initial_policy)
    for _, batch in batches:
        result.pairs += batch.pairs
        result.dropped.update(batch.dropped)
        result.sources.update(batch.sources)
    return result


def iter_pair_batches(
    simulator: DialogueSimulator,
    policy: ChatBackend,
    n_pairs: int,
    sampling: SamplingParams,
    seed: int,
    batch_size: int = 32,
    reset: ResetDistribution = REFUEL_RESET,
    initial_policy: ChatBackend | None = None,
    skip: frozenset[int] = frozenset(),
) -> Iterator[tuple[int, CollectionResult]]:
    """Yield ``(batch index, that batch's pairs and drops)`` one batch at a time (streaming).

    Arguments as in :func:`collect_pairs`. All reset points (including the reset mixture) are
    planned from ``seed`` first, and batch b's backend calls are seeded from ``(seed, b)`` alone, so
    any batch can be (re)run on its own: batches in ``skip`` (e.g. already on disk) are not run, and
    the others come out exactly as in an uninterrupted run.

    Raises:
        ValueError: see :meth:`~refuel.collection.resets.ResetDistribution.check` (raised before any batch).
    """
    reset.check(simulator, policy, initial_policy)
    points = plan_reset_points(simulator, n_pairs, np.random.default_rng(seed), reset)
    return _batches(simulator, policy, initial_policy or policy, points, sampling, seed, batch_size, skip)


def _batches(
    simulator: DialogueSimulator,
    policy: ChatBackend,
    rollin_policy: ChatBackend,
    points: list[ResetPoint],
    sampling: SamplingParams,
    seed: int,
    batch_size: int,
    skip: frozenset[int],
) -> Iterator[tuple[int, CollectionResult]]:
    """The generator behind :func:`iter_pair_batches` (which checks its arguments eagerly)."""
    env = VectorDialogueEnv(2 * batch_size, simulator=simulator, autoreset_mode=AutoresetMode.DISABLED)
    batches = [points[start : start + batch_size] for start in range(0, len(points), batch_size)]
    todo = [index for index in range(len(batches)) if index not in skip]  # the bar counts only batches run now
    progress = tqdm(  # in policy replies (turns), which a batch of many pairs advances every round
        total=sum(point.policy_turns for index in todo for point in batches[index]), desc="collect", unit="turn"
    )
    pairs_run = 0
    for done, index in enumerate(todo):
        rng = np.random.default_rng([seed, index])
        batch_points = batches[index]
        batch = _run_batch(env, policy, rollin_policy, batch_points, sampling, rng, progress)
        pairs_run += len(batch_points)
        progress.set_postfix_str(f"{done + 1}/{len(todo)} batches, {pairs_run} pairs")
        result = CollectionResult(sources=Counter(point.source for point in batch_points))
        for point, (snapshot, branches) in zip(batch_points, batch, strict=True):
            reason = _drop_reason(branches)
            if reason:
                result.dropped[reason] += 1
            else:
                result.pairs.append(pair_record(snapshot, branches, point))
        yield index, result
    progress.close()


def _run_batch(
    env: VectorDialogueEnv,
    policy: ChatBackend,
    rollin_policy: ChatBackend,
    points: list[ResetPoint],
    sampling: SamplingParams,
    rng: np.random.Generator,
    progress: tqdm,
) -> list[tuple[dict[str, Any], tuple[Branch, Branch] | None]]:
    """Run P ≤ num_envs / 2 pairs to the end; per pair its s_h snapshot and branches (None: roll-in ended).

    ``progress`` advances by the policy replies of each round."""
    half, n_pairs = env.num_envs // 2, len(points)
    padding = [None] * (env.num_envs - n_pairs)
    observations, infos = env.reset(
        seed=draw_seed(rng),
        options={
            "reset_mask": np.arange(env.num_envs) < n_pairs,
            "prompt_ids": [point.prompt_id for point in points] + padding,
            "horizons": [point.horizon for point in points] + padding,
            "prefixes": [point.offline.prefix(point.turn) if point.offline else None for point in points] + padding,
        },
    )
    snapshots: dict[int, dict[str, Any]] = {}  # pair k -> snapshot of s_h
    replies: dict[int, Completion] = {}  # slot -> its turn-h reply
    finished: dict[int, tuple[list[Message], float, bool]] = {}  # slot -> (messages, reward, truncated)
    while True:
        observations, infos = _reset_reached(env, observations, infos, points, snapshots)
        active = [int(i) for i in np.flatnonzero(infos["active"])]
        if not active:
            break
        rolling_in = [i for i in active if i < half and i not in snapshots]
        rolling_out = [i for i in active if i not in rolling_in]
        actions = [""] * env.num_envs
        groups = _calls(rollin_policy, rolling_in, policy, rolling_out)
        calls = [PolicyCall(backend, [list(observations[i]) for i in slots], rng) for backend, slots in groups]
        for (_, slots), completions in zip(groups, policy_turn(calls, sampling, progress), strict=True):
            for slot, completion in zip(slots, completions, strict=True):
                actions[slot] = completion.text
                if slot in rolling_out and slot not in replies:
                    replies[slot] = completion  # the first reply after the reset is the turn-h reply
        observations, rewards, terminated, truncated, infos = env.step(actions)
        for i in np.flatnonzero(terminated | truncated):
            finished[int(i)] = (list(observations[i]), float(rewards[i]), bool(truncated[i]))
    return [(snapshots.get(k, {}), _branches(k, half, finished, replies)) for k in range(n_pairs)]


def _reset_reached(
    env: VectorDialogueEnv,
    observations: Any,
    infos: dict[str, Any],
    points: list[ResetPoint],
    snapshots: dict[int, dict[str, Any]],
) -> tuple[Any, dict[str, Any]]:
    """Reset slots k and P+k to s_h for every pair k whose roll-in has just reached its turn h."""
    half = env.num_envs // 2
    reached = [
        k
        for k, point in enumerate(points)
        if k not in snapshots and infos["active"][k] and infos["turn"][k] == point.turn
    ]
    if not reached:
        return observations, infos
    mask, restore = np.zeros(env.num_envs, dtype=bool), [None] * env.num_envs
    for k in reached:
        snapshots[k] = json.loads(infos["snapshot"][k])
        mask[[k, half + k]] = True
        restore[k] = restore[half + k] = snapshots[k]
    return env.reset(options={"reset_mask": mask, "snapshots": restore})


def _calls(
    rollin_policy: ChatBackend, rolling_in: list[int], policy: ChatBackend, rolling_out: list[int]
) -> list[tuple[ChatBackend, list[int]]]:
    """The backend calls of one round: one when roll-in and roll-out use the same policy, else two."""
    if rollin_policy is policy:
        return [(policy, sorted(rolling_in + rolling_out))] if rolling_in or rolling_out else []
    return [(backend, slots) for backend, slots in ((rollin_policy, rolling_in), (policy, rolling_out)) if slots]


def _branches(
    k: int, half: int, finished: dict[int, tuple[list[Message], float, bool]], replies: dict[int, Completion]
) -> tuple[Branch, Branch] | None:
    """Pair k's two branches, or ``None`` when its roll-in ended (token budget) before s_h."""
    if k + half not in finished:
        return None
    return Branch(*finished[k], replies[k]), Branch(*finished[half + k], replies[half + k])


def _drop_reason(branches: tuple[Branch, Branch] | None) -> str | None:
    if branches is None or any(branch.truncated for branch in branches):
        return "truncated"
    if branches[0].reply.text == branches[1].reply.text:
        return "identical_replies"
    if any(np.isnan(branch.reward) for branch in branches):
        return "invalid_reward"
    return None


def sample_offline_dialogues(
    simulator: DialogueSimulator, policy: ChatBackend, n_dialogues: int, sampling: SamplingParams, seed: int
) -> list[OfflineDialogue]:
    """Offline dialogues played by ``policy`` (e.g. a demonstrator) with the simulated user, for dataset resets.

    Each runs over a prompt drawn uniformly (seeded) until the user message of turn max_horizon, so
    it offers every reset turn k = 1..max_horizon (unless the token budget ended it earlier: then it
    stops at its last user message). Ids are ``"sampled-<i>"``. One policy call and one user call per
    turn serve all dialogues.

    Raises:
        ValueError: ``n_dialogues`` < 1.
    """
    if n_dialogues < 1:
        raise ValueError(f"n_dialogues must be >= 1, got {n_dialogues}")
    rng = np.random.default_rng(seed)
    horizon = simulator.config.max_horizon
    states = [simulator.new_state(rng, {"horizon": horizon}) for _ in range(n_dialogues)]
    run_policy(simulator, policy, states, sampling, rng, until_turn=[horizon] * n_dialogues)
    return [
        OfflineDialogue(f"sampled-{i}", state.prompt_id, tuple(_up_to_last_user_message(state.messages)))
        for i, state in enumerate(states)
    ]


def _up_to_last_user_message(messages: list[Message]) -> list[Message]:
    last = max(i for i, message in enumerate(messages) if message["role"] == "user")
    return messages[: last + 1]


def pair_record(snapshot: dict[str, Any], branches: tuple[Branch, Branch], point: ResetPoint) -> Pair:
    """One REFUEL pair, from the snapshot of s_h, its two finished branches and its reset point.

    The fields are those of :class:`refuel.pairs.Pair` (its ``datasets`` schema:
    :data:`refuel.pairs.PAIR_FEATURES`); for a dataset reset, ``offline_id`` names the offline dialogue
    whose prefix s_k with k = ``turn`` is the shared state.
    """
    first, second = branches
    return Pair(
        prompt_id=snapshot["prompt_id"],
        turn=snapshot["turn"],
        horizon=snapshot["horizon"],
        reset_source=point.source,
        offline_id=point.offline.id if point.offline else "",
        snapshot_json=json.dumps(snapshot),
        dialogue=first.messages,
        dialogue_prime=second.messages,
        reward=first.reward,
        reward_prime=second.reward,
        prompt_token_ids=list(first.reply.prompt_token_ids),
        token_ids=list(first.reply.token_ids),
        token_ids_prime=list(second.reply.token_ids),
    )
