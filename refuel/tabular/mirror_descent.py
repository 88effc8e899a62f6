"""REFUEL on the tabular dialogue MDP: the exact mirror-descent update, the regression on a table, training.

REFUEL (Gao et al., ICLR 2025, arXiv 2410.04612) is derived from the KL-regularised policy update
against the current policy π_t (a mirror-descent / natural-policy-gradient step) at every turn h:

    π_{t+1}(·|s_h) = argmax_π  E_{y~π(·|s_h)}[Q^{π_t}(s_h, y)] − (1/η) KL(π(·|s_h) ‖ π_t(·|s_h)),

whose closed form is π_{t+1}(y|s_h) = π_t(y|s_h) exp(η Q^{π_t}(s_h, y)) / Z(s_h). Taking logs of two
replies y, y' at the same s_h cancels Z(s_h), and REFUEL regresses

    (ln π(y|s_h)/π_t(y|s_h) − ln π(y'|s_h)/π_t(y'|s_h))  onto  η (r(τ) − r(τ'))

on pairs collected at s_h ~ d^{π_t}_h with y, y' ~ π_t(·|s_h) and roll-outs with π_t to the horizon
(:func:`refuel.training.loss.refuel_loss`; the paper writes 1/η on the log-ratios). The relative future reward
r(τ) − r(τ') is an unbiased sample of Q^{π_t}(s_h, y) − Q^{π_t}(s_h, y').

Which Q: the Q in that update is the expected reward of the *complete* dialogue given s_h and the
turn-h reply, π_t afterwards, with the horizon H distributed as in the collected pairs given the reset
turn h. ``refuel.collection.collect`` draws H from the episode config and h ~ U{1..H}, so given h the horizon has
P(H | h) ∝ P(H)/H on H ≥ h: this is the conditional of q(H) ∝ P(H)/H, i.e. REFUEL's regression targets
Q under the horizon distribution q, not P (for the default H ~ U{1, 2, 3}, q = (6, 3, 2)/11 weights
short dialogues more). :func:`refuel_stop_probs` gives q's per-turn stop probabilities, and
:func:`mirror_descent_step` is the update above with that Q, exactly. With ``turn_rule="last"``
(h = H, the last-turn "LT" baselines) the target is the myopic Q(s_h, y) = r(s_h, y).

Fixed point: iterating the update from a full-support policy converges to an optimal policy of the
q-weighted objective (π_{t+1} = π_t only where Q^{π_t}(s, ·) is constant on π_t's support); because the
KL anchor moves with t, this is the unregularised optimum, not the optimum of a KL penalty to a fixed
π_ref (that one is :func:`refuel.tabular.dynamic_programming.kl_regularized_optimum`). The roll-in distribution only
weighs the states in the regression: with exact expectations on a table every state with positive weight gets
the same update, so where to reset (current policy, π_ref, a dataset) matters only through sampling:
a state the roll-in rarely reaches gets few pairs. :func:`compare_resets` measures this with the
collector's reset distributions (``refuel.collection.resets.ResetDistribution``), e.g. dataset resets to an
optimal demonstrator's prefixes (:func:`demonstrations`).

On a softmax table the regression is exactly solvable: ln π(y|s) − ln π(y'|s) is the logit
difference θ[s, y] − θ[s, y'], so the loss is quadratic in θ, and with exact expectations (every pair
enumerated with its probability, :func:`enumerate_pairs`) its minimiser is the mirror-descent update
for any η (test ``test_exact_regression_equals_mirror_descent``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dialogsim.prompts import OfflineDialogue
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator
from envs.tabular import DTYPE, TabularDialogueMDP, TabularPolicy
from refuel.collection.collect import collect_pairs, sample_offline_dialogues
from refuel.collection.resets import TURN_RULES, ResetDistribution
from refuel.tabular.dynamic_programming import (
    greedy_policy,
    horizon_probs,
    optimal_q_values,
    optimum_fraction,
    q_values,
    state_distribution,
    stop_probs,
)
from refuel.training.loss import LossInputs, refuel_loss

TABLE_SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=1)


def refuel_stop_probs(horizon_distribution: torch.Tensor, turn_rule: str = "uniform") -> torch.Tensor:
    """Per-turn stop probabilities of the horizon distribution REFUEL's pairs regress on, ``[H_max]``.

    Args:
        horizon_distribution: P(H) of the episodes, ``[H_max]``
            (``refuel.tabular.dynamic_programming.horizon_probs(config)``).
        turn_rule: ``"uniform"`` (h ~ U{1..H}: q(H) ∝ P(H)/H, see the module docstring) or ``"last"``
            (h = H: the dialogue ends at the reset turn, stop probability 1 at every turn).

    Raises:
        ValueError: unknown ``turn_rule``.
    """
    if turn_rule not in TURN_RULES:
        raise ValueError(f"turn_rule must be one of {TURN_RULES}, got {turn_rule!r}")
    probs = torch.as_tensor(horizon_distribution, dtype=DTYPE)
    if turn_rule == "last":
        return torch.ones_like(probs)
    weighted = probs / torch.arange(1, len(probs) + 1, dtype=DTYPE)
    return stop_probs(weighted / weighted.sum())


def mirror_descent_step(mdp: TabularDialogueMDP, logits: torch.Tensor, eta: float, stops: torch.Tensor) -> torch.Tensor:
    """The exact update π_{t+1}(y|s) ∝ π_t(y|s) exp(η Q^{π_t}(s, y)) at every state.

    Args:
        logits: θ_t, ``[n_states, n_replies]`` (nats); π_t = softmax(θ_t).
        eta: η (nats per reward unit).
        stops: per-turn stop probabilities of the Q (:func:`refuel_stop_probs`).

    Returns:
        θ_{t+1} = log π_t + η Q^{π_t}, ``[n_states, n_replies]`` (a logit table of π_{t+1}).
    """
    log_policy = torch.log_softmax(torch.as_tensor(logits, dtype=DTYPE), -1)
    q, _ = q_values(mdp, log_policy.exp(), stops)
    return log_policy + eta * q


def mirror_descent(
    mdp: TabularDialogueMDP, logits: torch.Tensor, eta: float, stops: torch.Tensor, iterations: int
) -> list[torch.Tensor]:
    """θ_0 .. θ_T of ``iterations`` exact mirror-descent steps (its fixed point is an optimal policy)."""
    thetas = [torch.as_tensor(logits, dtype=DTYPE)]
    for _ in range(iterations):
        thetas.append(mirror_descent_step(mdp, thetas[-1], eta, stops))
    return thetas


@dataclass
class PairTensors:
    """REFUEL pairs on the table, ``[B]`` each.

    Attributes:
        states: index of s_h.
        replies / replies_prime: indices of y and y' (the turn-h replies).
        rewards / rewards_prime: r(τ), r(τ') of the complete dialogues (reward units).
        weights: probability of each pair (exact enumeration), or ``None`` for sampled pairs (weight 1).
    """

    states: torch.Tensor
    replies: torch.Tensor
    replies_prime: torch.Tensor
    rewards: torch.Tensor
    rewards_prime: torch.Tensor
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.states)


def pairs_to_tensors(pairs: Sequence[dict[str, Any]], mdp: TabularDialogueMDP) -> PairTensors:
    """Table indices of pairs collected by :func:`refuel.collection.collect.collect_pairs` (see its pair record).

    Raises:
        TabularDialogueError: a pair's dialogue is not one of the MDP's.
    """
    states, replies, replies_prime = [], [], []
    for pair in pairs:
        turn = pair["turn"]
        states.append(mdp.state_index(pair["dialogue"][: 2 * turn - 1]))
        replies.append(mdp.reply_index(pair["dialogue"][2 * turn - 1]["content"]))
        replies_prime.append(mdp.reply_index(pair["dialogue_prime"][2 * turn - 1]["content"]))
    return PairTensors(
        states=torch.tensor(states, dtype=torch.int64),
        replies=torch.tensor(replies, dtype=torch.int64),
        replies_prime=torch.tensor(replies_prime, dtype=torch.int64),
        rewards=torch.tensor([pair["reward"] for pair in pairs], dtype=DTYPE),
        rewards_prime=torch.tensor([pair["reward_prime"] for pair in pairs], dtype=DTYPE),
    )


def _continuations(
    mdp: TabularDialogueMDP, policy: torch.Tensor, state: int, reply: int, horizon: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and final rewards of every way the dialogue goes on after ``reply`` at ``state``.

    The user and then ``policy`` play until the reply of turn ``horizon``; returns ``([K], [K])``.
    """
    if int(mdp.state_turns[state]) == horizon:
        return torch.ones(1, dtype=DTYPE), mdp.rewards[state, reply].reshape(1)
    probs, rewards = [], []
    for user_message in range(mdp.n_user_messages):
        child = mdp.child(state, reply, user_message)
        for next_reply in range(mdp.n_replies):
            p, r = _continuations(mdp, policy, child, next_reply, horizon)
            probs.append(mdp.user_probs[state, reply, user_message] * policy[child, next_reply] * p)
            rewards.append(r)
    return torch.cat(probs), torch.cat(rewards)


def enumerate_pairs(
    mdp: TabularDialogueMDP,
    policy: torch.Tensor,
    horizon_distribution: torch.Tensor,
    turn_rule: str = "uniform",
    rollin_policy: torch.Tensor | None = None,
) -> PairTensors:
    """Every pair ``collect_pairs`` can produce, with its probability (exact expectations).

    A pair is drawn as in :mod:`refuel.collection.collect`: H ~ P(H); h ~ U{1..H} (``"uniform"``) or h = H
    (``"last"``); s_h ~ d_h of the roll-in policy; y, y' ~ π(·|s_h) independently; both dialogues
    continued by the user and π to turn H and scored there. Pairs with y = y' are dropped (as
    ``collect_pairs`` does), so the weights sum to P(y ≠ y') < 1. This enumerates the complete dialogues
    (not Q), so it checks the dynamic programming independently.

    Args:
        policy: π_t, ``[n_states, n_replies]`` probabilities (replies and roll-outs).
        horizon_distribution: P(H), ``[max_horizon]``.
        turn_rule: ``"uniform"`` or ``"last"``.
        rollin_policy: probabilities of the roll-in policy; ``None`` rolls in with ``policy`` (REFUEL).

    Returns:
        :class:`PairTensors` with ``weights`` the probability of each pair, ``[B]`` (B ≈ 8.5k for the
        5-state MDP, ≈ 9.5k for the 43-state tree).

    Raises:
        ValueError: unknown ``turn_rule``.
    """
    if turn_rule not in TURN_RULES:
        raise ValueError(f"turn_rule must be one of {TURN_RULES}, got {turn_rule!r}")
    policy = torch.as_tensor(policy, dtype=DTYPE)
    reach = state_distribution(mdp, policy if rollin_policy is None else rollin_policy)  # [n_states]
    columns: dict[str, list[torch.Tensor]] = {key: [] for key in ("s", "y", "y2", "r", "r2", "w")}
    for horizon in range(1, mdp.max_horizon + 1):
        p_horizon = float(horizon_distribution[horizon - 1])
        if p_horizon == 0:
            continue
        turns = range(1, horizon + 1) if turn_rule == "uniform" else [horizon]
        for turn in turns:
            p_turn = p_horizon / horizon if turn_rule == "uniform" else p_horizon
            here = mdp.turn_slice(turn)
            for state in range(here.start, here.stop):
                outcomes = [_continuations(mdp, policy, state, reply, horizon) for reply in range(mdp.n_replies)]
                for y in range(mdp.n_replies):
                    for y_prime in range(mdp.n_replies):
                        if y == y_prime:
                            continue
                        (p, r), (p2, r2) = outcomes[y], outcomes[y_prime]
                        weight = p_turn * reach[state] * policy[state, y] * policy[state, y_prime]
                        n = len(p) * len(p2)
                        columns["w"].append((weight * p[:, None] * p2[None, :]).reshape(-1))  # [K · K']
                        columns["r"].append(r[:, None].expand(-1, len(p2)).reshape(-1))
                        columns["r2"].append(r2[None, :].expand(len(p), -1).reshape(-1))
                        columns["s"].append(torch.full((n,), state, dtype=torch.int64))
                        columns["y"].append(torch.full((n,), y, dtype=torch.int64))
                        columns["y2"].append(torch.full((n,), y_prime, dtype=torch.int64))
    cat = {key: torch.cat(values) for key, values in columns.items()}
    return PairTensors(cat["s"], cat["y"], cat["y2"], cat["r"], cat["r2"], cat["w"])


def fit_refuel_table(logits: torch.Tensor, pairs: PairTensors, eta: float, max_steps: int = 3) -> torch.Tensor:
    """Solve one REFUEL regression on a softmax table to convergence.

    Minimises :func:`refuel.training.loss.refuel_loss` over the table θ, with π_t = softmax(``logits``) giving the
    log-probs ``logp_t`` (temperature 1). The loss is quadratic in θ, because
    ln π(y|s) − ln π(y'|s) = θ[s, y] − θ[s, y'], and its Hessian is block-diagonal with one
    ``[n_replies, n_replies]`` block per state (pairs only couple replies at the same state). So each
    step is an exact Newton step on refuel_loss's own autograd gradient and Hessian (the blocks from
    n_replies Hessian-vector products), with a per-state pseudo-inverse: the regression fixes only the
    logit differences between replies that appear in pairs at the same state, and the pseudo-inverse
    returns the solution that changes θ least (the other logits keep their values, as a gradient
    method started at θ_t would). A generic optimiser is a poor fit here: with exact expectations the
    state weights span many decades, and full-batch L-BFGS was still 1e-3 off after 500 iterations.
    Steps are repeated until the gradient vanishes (one suffices up to rounding).

    Weighted pairs (exact enumeration) enter refuel_loss with every input scaled by √(w·B/Σw), which
    turns its mean into the w-weighted mean (the inputs enter linearly before squaring).

    Args:
        logits: θ_t, ``[n_states, n_replies]`` (nats).
        pairs: the pairs; states / replies index the table.
        eta: η (nats per reward unit).
        max_steps: Newton steps at most.

    Returns:
        θ_{t+1}, ``[n_states, n_replies]``.

    Raises:
        ValueError: no pairs.
    """
    if len(pairs) == 0:
        raise ValueError("no pairs to fit; collect more (every pair was dropped?)")
    theta_t = torch.as_tensor(logits, dtype=DTYPE)
    n_replies = theta_t.shape[1]
    log_policy_t = torch.log_softmax(theta_t, -1)  # [n_states, A]
    scale = torch.ones(len(pairs), dtype=DTYPE)
    if pairs.weights is not None:
        scale = (pairs.weights * len(pairs) / pairs.weights.sum()).sqrt()  # [B]
    logp_t = scale * log_policy_t[pairs.states, pairs.replies]  # [B]
    logp_t_prime = scale * log_policy_t[pairs.states, pairs.replies_prime]  # [B]
    reward, reward_prime = scale * pairs.rewards, scale * pairs.rewards_prime  # [B]

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        log_policy = torch.log_softmax(theta, -1)  # [n_states, A]
        logp = scale * log_policy[pairs.states, pairs.replies]  # [B]
        logp_prime = scale * log_policy[pairs.states, pairs.replies_prime]  # [B]
        inputs = LossInputs(logp, logp_prime, logp_t, logp_t_prime, reward, reward_prime)
        return refuel_loss(inputs, eta)

    theta = theta_t.clone()
    for _ in range(max_steps):
        theta.requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss_of(theta), theta, create_graph=True)  # [n_states, A]
        if gradient.abs().max() < 1e-12:
            break
        # The Hessian is block-diagonal per state, so the product with the one-hot direction "reply a at
        # every state" is column a of every state's block: n_replies products give all the blocks.
        columns = []
        for reply in range(n_replies):
            direction = torch.zeros_like(theta)
            direction[:, reply] = 1.0
            (column,) = torch.autograd.grad(gradient, theta, grad_outputs=direction, retain_graph=True)
            columns.append(column)  # [n_states, A]
        blocks = torch.stack(columns, -1)  # [n_states, A, A]
        step = torch.linalg.pinv(blocks, rtol=1e-10, hermitian=True) @ gradient.detach()[..., None]  # [n_states, A, 1]
        theta = (theta - step.squeeze(-1)).detach()
    return theta.detach()


def iteration_seed(seed: int, iteration: int) -> int:
    """The collection seed of one training iteration (independent streams per (seed, iteration))."""
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


@dataclass
class TableTraining:
    """What :func:`train_refuel_table` produced.

    Attributes:
        logits: θ_0 .. θ_T, ``[n_states, n_replies]`` each.
        kept: kept pairs per iteration.
        dropped: dropped pairs per iteration, by reason.
    """

    logits: list[torch.Tensor] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    dropped: list[dict[str, int]] = field(default_factory=list)

    def policies(self) -> list[torch.Tensor]:
        """π_0 .. π_T as probabilities ``[n_states, n_replies]``."""
        return [torch.softmax(theta, -1) for theta in self.logits]


def train_refuel_table(
    simulator: DialogueSimulator,
    policy: TabularPolicy,
    iterations: int,
    n_pairs: int,
    eta: float,
    seed: int,
    batch_size: int = 512,
    collect: Callable[..., Any] = collect_pairs,
    **collect_kwargs: Any,
) -> TableTraining:
    """REFUEL on the table: per iteration, collect pairs with the real collector, then fit the table.

    Each iteration calls ``collect(simulator, policy, n_pairs, TABLE_SAMPLING, seed=..., batch_size=...,
    **collect_kwargs)`` (default :func:`refuel.collection.collect.collect_pairs`; e.g.
    ``reset=ResetDistribution.last_turn()`` and ``initial_policy=`` for the last-turn baselines) and
    :func:`fit_refuel_table` on the kept pairs;
    ``policy.logits`` is replaced in place. Sampling is :data:`TABLE_SAMPLING` (temperature 1, the
    temperature of the fit's log-probabilities). An iteration whose pairs were all dropped (the policy
    has become deterministic) leaves the table unchanged.

    Args:
        simulator: a tabular simulator (:func:`envs.tabular.build_tabular_simulator`).
        policy: π_0 on entry, π_T on return.
        iterations: T.
        n_pairs: reset points per iteration.
        eta: η (nats per reward unit).
        seed: seeds every iteration's collection.

    Raises:
        ValueError: ``iterations`` < 0.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    mdp = policy.mdp
    run = TableTraining(logits=[policy.logits.clone()])
    for iteration in range(iterations):
        result = collect(
            simulator,
            policy,
            n_pairs,
            TABLE_SAMPLING,
            seed=iteration_seed(seed, iteration),
            batch_size=batch_size,
            **collect_kwargs,
        )
        run.kept.append(len(result.pairs))
        run.dropped.append(dict(result.dropped))
        if result.pairs:
            policy.logits = fit_refuel_table(policy.logits, pairs_to_tensors(result.pairs, mdp), eta)
        run.logits.append(policy.logits.clone())
    return run


# --- where to reset: comparing reset distributions ------------------------------------------------


def first_iteration_reaching(fractions: Sequence[float], threshold: float = 0.95) -> int | None:
    """The first iteration t whose π_t reached ``threshold`` of the optimum, or None.

    ``fractions`` are :func:`~refuel.tabular.dynamic_programming.optimum_fraction` values of π_0 .. π_T.
    """
    return next((t for t, fraction in enumerate(fractions) if fraction >= threshold), None)


def demonstrations(simulator: DialogueSimulator, n_dialogues: int, seed: int) -> list[OfflineDialogue]:
    """Offline dialogues of an optimal demonstrator on a tabular simulator (greedy in Q*), to turn max_horizon.

    Q* is taken under the simulator's horizon distribution; the demonstrator is a
    :class:`~envs.tabular.TabularPolicy` that plays the optimal reply with probability 1 − 2e-12.
    Returns :class:`~dialogsim.prompts.OfflineDialogue` values for ``ResetDistribution("dataset", ...)``.
    """
    mdp: TabularDialogueMDP = simulator.user.mdp  # type: ignore[attr-defined]
    q_star, _ = optimal_q_values(mdp, stop_probs(horizon_probs(simulator.config)))
    demonstrator = TabularPolicy(mdp, greedy_policy(q_star).clamp_min(1e-12).log(), name="demonstrator")
    return sample_offline_dialogues(simulator, demonstrator, n_dialogues, TABLE_SAMPLING, seed)


def compare_resets(
    simulator: DialogueSimulator,
    base_logits: torch.Tensor,
    resets: dict[str, ResetDistribution],
    seeds: Sequence[int],
    iterations: int,
    n_pairs: int,
    eta: float,
    batch_size: int = 16,
) -> dict[str, list[list[float]]]:
    """REFUEL from π_0 = softmax(``base_logits``) with each reset distribution, per seed.

    A ``rollin="initial"`` distribution rolls in with π_ref = π_0 (fixed). Every run uses the same
    collection seeds per (seed, iteration) (:func:`train_refuel_table`), so the variants differ only
    in where pairs start.

    Returns:
        For each name in ``resets``, per seed, :func:`~refuel.tabular.dynamic_programming.optimum_fraction` of
        π_0 .. π_T over π_0.
    """
    mdp: TabularDialogueMDP = simulator.user.mdp  # type: ignore[attr-defined]
    base, horizons = torch.softmax(base_logits, -1), horizon_probs(simulator.config)
    curves: dict[str, list[list[float]]] = {}
    for name, reset in resets.items():
        initial = TabularPolicy(mdp, base_logits, name="initial") if reset.needs_initial_policy else None
        curves[name] = []
        for seed in seeds:
            run = train_refuel_table(
                simulator,
                TabularPolicy(mdp, base_logits),
                iterations,
                n_pairs,
                eta,
                seed,
                batch_size,
                reset=reset,
                initial_policy=initial,
            )
            curves[name].append([optimum_fraction(mdp, policy, base, horizons) for policy in run.policies()])
    return curves
