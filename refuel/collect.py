"""REFUEL pair collection on the vector env: roll-in with π_t to turn h, reset, two replies, roll-outs.

Follows the REFUEL public code (DESIGN.md §4): the horizon H is drawn uniformly from
1..max_horizon, the reset turn h uniformly from 1..H; both dialogues share the state s_h and differ
from the turn-h reply on; both are scored at the horizon.

A batch of P pairs runs on a :class:`~envs.vector_env.VectorDialogueEnv` of 2P conversations with
autoreset disabled: slots 0..P−1 roll in; when pair k reaches s_h, slots k and P+k are both reset to
its snapshot and from then on carry y and y'. Every round makes one policy call for all active
conversations (two when the roll-in policy differs from π_t), one user call and one reward call, so
roll-ins, both branches and all roll-outs of a batch share calls, and a batch needs max(H) rounds.

Where pairs start is a choice (:class:`ResetDistribution`): roll in with the current policy π_t
(REFUEL); with a reference policy π_ref, mixed with prompt starts (the PPO++ idea: start states from
β·D + (1−β)·d^{π_ref}); or reset to prefixes of offline dialogues with some probability and roll in
with π_t otherwise (the DR-PO idea: reset the learner to states of demonstrations). Every pair row
records its ``reset_source``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
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
from refuel.pairs import Pair
from refuel.rollout import draw_seed, run_policy

DROP_REASONS = ("identical_replies", "truncated", "invalid_reward")
RESET_TURNS = ("uniform", "last")
ROLLINS = ("current", "reference", "dataset")
RESET_SOURCES = ("current", "reference", "prompt", "dataset")


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
class ResetDistribution:
    """The distribution of the reset states s_h that REFUEL pairs start from.

    - ``rollin="current"`` (REFUEL, the default): roll in with π_t to h ~ U{1..H}.
    - ``rollin="reference"``: with probability ``beta`` the pair starts at the prompt (h = 1, no
      roll-in; ``reset_source`` ``"prompt"``), otherwise it rolls in with π_ref (the ``rollin_policy``
      backend of :func:`collect_pairs`) to h ~ U{1..H}. The idea of PPO++ (Chang et al., 2023,
      arXiv 2306.11816): start states from β·D + (1−β)·d^{π_ref}, D the prompt distribution.
    - ``rollin="dataset"``: with probability ``dataset_weight`` the pair resets to the prefix s_k of
      an offline dialogue (its messages up to and including its k-th user message), h = k, and π_t
      answers and continues from there with the simulated user; otherwise it rolls in with π_t. The
      idea of DR-PO (Chang et al., 2024, arXiv 2404.08495): reset the learner to states of offline
      demonstrations, so it is trained where its own roll-ins rarely go.

    Pair rows record their ``reset_source`` (``"current"``, ``"reference"``, ``"prompt"`` or
    ``"dataset"``). The mixture is drawn per reset point from the collection seed, on top of the
    usual plan (prompt, H, h), which it leaves unchanged (see :func:`plan_reset_points`).

    Attributes:
        rollin: ``"current"`` | ``"reference"`` | ``"dataset"``.
        beta: β ∈ [0, 1], probability of a prompt start (``rollin="reference"`` only).
        dataset_weight: w ∈ [0, 1], probability of a dataset reset (``rollin="dataset"`` only).
        offline: the offline dialogues (``rollin="dataset"`` only), from
            :func:`dialogsim.data.load_offline_dialogues`; each one's ``prompt_id`` must be among the
            simulator's prompts.

    Raises:
        ValueError: unknown ``rollin``; ``beta`` or ``dataset_weight`` outside [0, 1] or given for
            another ``rollin``; ``rollin="dataset"`` without offline dialogues, or offline
            dialogues for another ``rollin``.
        TypeError: an ``offline`` entry that is not an :class:`~dialogsim.prompts.OfflineDialogue`.

    >>> ResetDistribution("reference", beta=0.5)
    ResetDistribution(rollin='reference', beta=0.5, dataset_weight=0.0)
    """

    rollin: str = "current"
    beta: float = 0.0
    dataset_weight: float = 0.0
    offline: tuple[OfflineDialogue, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.rollin not in ROLLINS:
            raise ValueError(f"rollin must be one of {ROLLINS}, got {self.rollin!r}")
        object.__setattr__(self, "offline", tuple(self.offline))
        for name, value, owner in (
            ("beta", self.beta, "reference"),
            ("dataset_weight", self.dataset_weight, "dataset"),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
            if value and self.rollin != owner:
                raise ValueError(f"{name}={value} applies to rollin={owner!r} only; this is rollin={self.rollin!r}")
        if self.rollin == "dataset" and not self.offline:
            raise ValueError(
                "rollin='dataset' needs offline dialogues: offline=tuple(dialogsim.data.load_offline_dialogues(...)[0])"
            )
        if self.offline and self.rollin != "dataset":
            raise ValueError(f"offline dialogues apply to rollin='dataset' only; this is rollin={self.rollin!r}")
        for index, dialogue in enumerate(self.offline):
            if not isinstance(dialogue, OfflineDialogue):
                raise TypeError(f"offline[{index}] must be an OfflineDialogue, got {type(dialogue).__name__}")

    @property
    def mixture(self) -> float:
        """Probability that a reset point comes from the mixed-in part (β or w)."""
        return self.beta if self.rollin == "reference" else self.dataset_weight


@dataclass(frozen=True)
class ResetPoint:
    """Where one pair starts: the prompt, the horizon H, the reset turn h (1 ≤ h ≤ H) and the source.

    ``source`` is the pair's ``reset_source``; for ``"dataset"`` the pair starts from
    ``offline.prefix(turn)``.
    """

    prompt_id: str
    horizon: int
    turn: int
    source: str = "current"
    offline: OfflineDialogue | None = None


@dataclass(frozen=True)
class Branch:
    """One finished dialogue of a pair: its messages, horizon reward, truncation and turn-h reply."""

    messages: list[Message]
    reward: float
    truncated: bool
    reply: Completion


def plan_reset_points(
    simulator: DialogueSimulator,
    n_pairs: int,
    rng: np.random.Generator,
    reset_turn: str = "uniform",
    reset: ResetDistribution | None = None,
) -> list[ResetPoint]:
    """One reset point per pair: prompts without replacement (cycling), H ~ U{1..max_horizon}, h.

    Then, for ``reset`` with β or w > 0, each point is independently replaced with that probability
    (draws from a generator seeded after the plan above, which therefore does not change):

    - ``rollin="reference"``: a prompt start, h = 1 (same prompt and H), source ``"prompt"``.
    - ``rollin="dataset"``: a reset to an offline dialogue d (cycling through them in a random order),
      whose prompt replaces the planned one, H kept, h = k: the planned h if d has at least h user
      messages, else k ~ U{1..K_d}; so k ~ U{1..min(H, K_d)} (with ``reset_turn="last"``,
      k = min(H, K_d)). Source ``"dataset"``.

    The other points have source ``"reference"`` for ``rollin="reference"``, else ``"current"``.

    Args:
        reset_turn: ``"uniform"`` draws h ~ U{1..H} (REFUEL); ``"last"`` sets h = H (the last-turn
            "LT" baselines of the paper).
        reset: the reset distribution; ``None`` is ``ResetDistribution()`` (roll in with π_t).

    Raises:
        ValueError: unknown ``reset_turn``.
    """
    if reset_turn not in RESET_TURNS:
        raise ValueError(f"reset_turn must be one of {RESET_TURNS}, got {reset_turn!r}")
    reset = reset or ResetDistribution()
    source = "reference" if reset.rollin == "reference" else "current"
    order = rng.permutation(len(simulator.prompt_ids))
    points = []
    for index in range(n_pairs):
        prompt_id = simulator.prompt_ids[int(order[index % len(order)])]
        horizon = simulator.config.horizon or int(rng.integers(1, simulator.config.max_horizon + 1))
        turn = horizon if reset_turn == "last" else int(rng.integers(1, horizon + 1))
        points.append(ResetPoint(prompt_id, horizon, turn, source))
    if reset.mixture == 0:
        return points
    mix = np.random.default_rng(int(rng.integers(2**63)))
    chosen = np.flatnonzero(mix.random(n_pairs) < reset.mixture)
    if reset.rollin == "reference":
        for index in chosen:
            points[index] = replace(points[index], turn=1, source="prompt")
        return points
    offline_order = mix.permutation(len(reset.offline))
    for rank, index in enumerate(chosen):
        dialogue = reset.offline[int(offline_order[rank % len(offline_order)])]
        points[index] = _dataset_point(points[index], dialogue, reset_turn, mix)
    return points


def _dataset_point(
    point: ResetPoint, dialogue: OfflineDialogue, reset_turn: str, rng: np.random.Generator
) -> ResetPoint:
    """``point`` moved to the prefix s_k of ``dialogue``: k ~ U{1..min(H, K_d)}, or min(H, K_d) for "last"."""
    longest = min(point.horizon, dialogue.turns)
    if reset_turn == "last":
        turn = longest
    else:  # the planned h ~ U{1..H} if it is ≤ K_d, else a fresh draw: uniform on 1..min(H, K_d) either way
        turn = point.turn if point.turn <= longest else int(rng.integers(1, longest + 1))
    return replace(point, prompt_id=dialogue.prompt_id, turn=turn, source="dataset", offline=dialogue)


def resolve_reset(
    reset: ResetDistribution | None,
    simulator: DialogueSimulator,
    policy: ChatBackend,
    rollin_policy: ChatBackend | None,
) -> ResetDistribution:
    """The reset distribution a collection uses, checked against the simulator and the backends.

    ``reset=None`` keeps the behaviour from before reset distributions existed: roll in with
    ``rollin_policy`` if one is given (``rollin="reference"``, β = 0: the last-turn baselines), else
    with π_t (``rollin="current"``).

    Raises:
        ValueError: ``rollin="reference"`` without ``rollin_policy``; ``rollin_policy`` with
            ``rollin="current"`` / ``"dataset"`` (they roll in with π_t); an offline dialogue whose
            ``prompt_id`` the simulator does not know.
    """
    if reset is None:
        return ResetDistribution("reference" if rollin_policy is not None else "current")
    if reset.rollin == "reference" and rollin_policy is None:
        raise ValueError("rollin='reference' rolls in with π_ref: pass its backend as rollin_policy=")
    if reset.rollin != "reference" and rollin_policy is not None and rollin_policy is not policy:
        raise ValueError(
            f"rollin={reset.rollin!r} rolls in with the current policy π_t, so rollin_policy must be None; "
            "use ResetDistribution('reference', beta=...) to roll in with π_ref"
        )
    unknown = [d.id for d in reset.offline if d.prompt_id not in simulator.prompts]
    if unknown:
        raise ValueError(
            f"{len(unknown)} offline dialogues belong to prompts the simulator does not have (first: {unknown[:3]}); "
            "load them with dialogsim.data.load_offline_dialogues(source, list(simulator.prompts.values()))"
        )
    return reset


def collect_pairs(
    simulator: DialogueSimulator,
    policy: ChatBackend,
    n_pairs: int,
    sampling: SamplingParams,
    seed: int,
    batch_size: int = 32,
    rollin_policy: ChatBackend | None = None,
    reset_turn: str = "uniform",
    reset: ResetDistribution | None = None,
) -> CollectionResult:
    """Collect up to ``n_pairs`` REFUEL pairs with the current policy π_t, in memory.

    Args:
        simulator: the conversation simulator (prompts, simulated user, reward, episode rules).
        policy: backend of π_t (the turn-h replies y, y' and the roll-outs).
        n_pairs: number of reset points to try; dropped pairs are counted, not replaced.
        sampling: π_t's sampling settings (temperature is also used for the log-probabilities).
        seed: seeds prompt order, H, h, the reset mixture and every backend call.
        batch_size: pairs advanced together (2 × batch_size conversations in the vector env).
        rollin_policy: backend of π_ref that generates turns 1..h−1 for ``rollin="reference"``;
            with ``reset=None`` giving it rolls in with it (the histories of the last-turn baselines),
            and ``None`` rolls in with π_t (REFUEL).
        reset_turn: see :func:`plan_reset_points`.
        reset: where pairs start (:class:`ResetDistribution`); ``None``: see :func:`resolve_reset`.

    Returns:
        The kept pairs (:class:`~refuel.pairs.Pair`, see :func:`pair_record`), the drop counts and the reset points per
        source, merged over the batches of :func:`iter_pair_batches`.

    Raises:
        ValueError: see :func:`resolve_reset` and :func:`plan_reset_points`.
    """
    result = CollectionResult()
    batches = iter_pair_batches(
        simulator, policy, n_pairs, sampling, seed, batch_size, rollin_policy, reset_turn, reset=reset
    )
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
    rollin_policy: ChatBackend | None = None,
    reset_turn: str = "uniform",
    skip: frozenset[int] = frozenset(),
    reset: ResetDistribution | None = None,
) -> Iterator[tuple[int, CollectionResult]]:
    """Yield ``(batch index, that batch's pairs and drops)`` one batch at a time (streaming).

    Arguments as in :func:`collect_pairs`. All reset points (including the reset mixture) are
    planned from ``seed`` first, and batch b's backend calls are seeded from ``(seed, b)`` alone, so
    any batch can be (re)run on its own: batches in ``skip`` (e.g. already on disk) are not run, and
    the others come out exactly as in an uninterrupted run.

    Raises:
        ValueError: see :func:`resolve_reset` and :func:`plan_reset_points` (raised before any batch).
    """
    reset = resolve_reset(reset, simulator, policy, rollin_policy)
    points = plan_reset_points(simulator, n_pairs, np.random.default_rng(seed), reset_turn, reset)
    return _batches(simulator, policy, rollin_policy or policy, points, sampling, seed, batch_size, skip)


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
    starts = range(0, len(points), batch_size)
    todo = [index for index in range(len(starts)) if index not in skip]  # the bar counts only batches run now
    for index in tqdm(todo, desc="collect pairs", unit="batch"):
        start = starts[index]
        rng = np.random.default_rng([seed, index])
        batch_points = points[start : start + batch_size]
        batch = _run_batch(env, policy, rollin_policy, batch_points, sampling, rng)
        result = CollectionResult(sources=Counter(point.source for point in batch_points))
        for point, (snapshot, branches) in zip(batch_points, batch, strict=True):
            reason = _drop_reason(branches)
            if reason:
                result.dropped[reason] += 1
            else:
                result.pairs.append(pair_record(snapshot, branches, point))
        yield index, result


def _run_batch(
    env: VectorDialogueEnv,
    policy: ChatBackend,
    rollin_policy: ChatBackend,
    points: list[ResetPoint],
    sampling: SamplingParams,
    rng: np.random.Generator,
) -> list[tuple[dict[str, Any], tuple[Branch, Branch] | None]]:
    """Run P ≤ num_envs / 2 pairs to the end; per pair its s_h snapshot and branches (None: roll-in ended)."""
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
        for backend, slots in _calls(rollin_policy, rolling_in, policy, rolling_out):
            completions = backend.chat([list(observations[i]) for i in slots], sampling.with_seed(draw_seed(rng)))
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
