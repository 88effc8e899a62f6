"""Exact dynamic programming on the tabular dialogue MDP (:mod:`envs.tabular`).

All tensors are float64, rewards in reward-model units, policies probabilities ``[n_states, n_replies]``.

- :func:`q_values`: Q^π(s, a) and V^π(s) for every state, for any horizon distribution given as
  per-turn stop probabilities (:func:`stop_probs`; :func:`horizon_probs` gives a simulator's P(H)).
- :func:`optimal_q_values` / :func:`greedy_policy`: Q*, V* and an optimal policy.
- :func:`kl_regularized_optimum` / :func:`regularized_value`: the optimum and the value of
  E[r] − (1/β) Σ_h KL(π(·|s_h) ‖ π_ref(·|s_h)) for a fixed reference π_ref (soft dynamic programming).
- :func:`state_distribution`, :func:`turn_values`, :func:`policy_value`, :func:`turn_win_rates`: the
  roll-in distribution d^π_h, the per-turn value V_h(π) = E_π[r(τ_{1:h})], the expected episode reward,
  and the exact per-turn win rate against a baseline policy.
- :func:`optimum_fraction`: the share of the possible improvement over a base policy that a policy reached.

These are the exact quantities :mod:`refuel.tabular.mirror_descent` checks REFUEL against (mirror descent, the
regression on a table, sampled training).
"""

from __future__ import annotations

from typing import Any

import torch

from dialogsim.simulator import EpisodeConfig
from envs.tabular.mdp import DTYPE, TabularDialogueMDP


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


def optimum_fraction(
    mdp: TabularDialogueMDP, policy: torch.Tensor, base: torch.Tensor, horizon_distribution: torch.Tensor
) -> float:
    """(V(π) − V(π_0)) / (V* − V(π_0)): the share of the possible improvement over ``base`` that π reached.

    V is the expected episode reward under ``horizon_distribution`` (:func:`horizon_probs`); π and
    π_0 = ``base`` are probabilities ``[n_states, n_replies]``. Stricter than V(π) / V*.
    """
    _, v_star = optimal_q_values(mdp, stop_probs(horizon_distribution))
    v_base = policy_value(mdp, base, horizon_distribution)
    return (policy_value(mdp, policy, horizon_distribution) - v_base) / (float(v_star[0]) - v_base)
