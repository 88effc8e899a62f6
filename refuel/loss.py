"""The REFUEL regression loss and its diagnostics (pure functions on tensors)."""

from __future__ import annotations

import torch


def refuel_loss(
    logp: torch.Tensor,
    logp_prime: torch.Tensor,
    ref_logp: torch.Tensor,
    ref_logp_prime: torch.Tensor,
    reward: torch.Tensor,
    reward_prime: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """Mean squared error of the relative log-ratio against the scaled relative future reward.

    For each pair (REFUEL, Gao et al. 2025, Eq. 5 / Algorithm 1, written with η on the reward):

        ((ln π(y|s_h) − ln π_t(y|s_h)) − (ln π(y'|s_h) − ln π_t(y'|s_h)) − η (r − r'))²

    This is the paper's objective multiplied by η² (the paper puts 1/η on the log-ratios), so the
    minimiser is the same.

    Args:
        logp, logp_prime: ln π(y|s_h), ln π(y'|s_h) of the policy being trained, ``[B]`` nats
            (sums over the turn-h reply tokens only).
        ref_logp, ref_logp_prime: the same under π_t, computed once before the iteration, ``[B]``.
        reward, reward_prime: r, r' of the two complete dialogues, ``[B]`` (reward-model units).
        eta: η, the scale of the relative future reward (nats per reward unit).

    Returns:
        Scalar loss (nats²).

    Raises:
        ValueError: the inputs do not all have the same shape ``[B]``.
    """
    shapes = {tuple(t.shape) for t in (logp, logp_prime, ref_logp, ref_logp_prime, reward, reward_prime)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"all REFUEL loss inputs must share one shape [B]; got shapes {sorted(shapes)}")
    relative_log_ratio = (logp - ref_logp) - (logp_prime - ref_logp_prime)  # [B]
    relative_reward = eta * (reward - reward_prime)  # [B]
    return ((relative_log_ratio - relative_reward) ** 2).mean()


def sign_agreement(relative_log_ratio: torch.Tensor, relative_reward: torch.Tensor) -> float:
    """Fraction of pairs with r ≠ r' whose relative log-ratio has the sign of r − r' (NaN if none).

    Args:
        relative_log_ratio: (ln π/π_t)(y) − (ln π/π_t)(y'), ``[B]`` nats.
        relative_reward: r − r', ``[B]``.
    """
    informative = relative_reward != 0
    if not informative.any():
        return float("nan")
    agree = torch.sign(relative_log_ratio[informative]) == torch.sign(relative_reward[informative])
    return agree.float().mean().item()
