"""The REFUEL regression loss, the DPO baseline loss and their diagnostics (pure functions on tensors)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossInputs(NamedTuple):
    """What the pair losses take for B pairs, ``[B]`` each.

    Attributes:
        logp, logp_prime: ln π(y|s_h), ln π(y'|s_h) of the policy being trained, nats (sums over the
            turn-h reply tokens only).
        logp_t, logp_t_prime: the same under π_t, computed once before the iteration, nats.
        reward, reward_prime: r, r' of the two complete dialogues (reward-model units).
    """

    logp: torch.Tensor
    logp_prime: torch.Tensor
    logp_t: torch.Tensor
    logp_t_prime: torch.Tensor
    reward: torch.Tensor
    reward_prime: torch.Tensor

    @classmethod
    def from_replies(cls, logp: torch.Tensor, logp_t: torch.Tensor, reward: torch.Tensor) -> LossInputs:
        """The inputs of B pairs from ``[2B]`` values in batch order: the B replies y, then the B replies y'.

        ``logp_t`` and ``reward`` are cast to ``logp``'s dtype.
        """
        logp_t, reward = logp_t.to(logp.dtype), reward.to(logp.dtype)
        (y, y_prime), (t, t_prime), (r, r_prime) = (torch.tensor_split(v, 2) for v in (logp, logp_t, reward))
        return cls(logp=y, logp_prime=y_prime, logp_t=t, logp_t_prime=t_prime, reward=r, reward_prime=r_prime)

    def relative_log_ratio(self) -> torch.Tensor:
        """(ln π(y|s_h) − ln π_t(y|s_h)) − (ln π(y'|s_h) − ln π_t(y'|s_h)), ``[B]`` nats."""
        return relative_log_ratio(self.logp, self.logp_prime, self.logp_t, self.logp_t_prime)


def refuel_loss(inputs: LossInputs, eta: float) -> torch.Tensor:
    """Mean squared error of the relative log-ratio against the scaled relative future reward.

    For each pair (REFUEL, Gao et al. 2025, Eq. 5 / Algorithm 1, written with η on the reward):

        ((ln π(y|s_h) − ln π_t(y|s_h)) − (ln π(y'|s_h) − ln π_t(y'|s_h)) − η (r − r'))²

    This is the paper's objective multiplied by η² (the paper puts 1/η on the log-ratios), so the
    minimiser is the same.

    Args:
        inputs: the B pairs' log-probs under π and π_t and their rewards, ``[B]`` each.
        eta: η, the scale of the relative future reward (nats per reward unit).

    Returns:
        Scalar loss (nats²).

    Raises:
        ValueError: the inputs do not all have the same shape ``[B]``.
    """
    _check_pair_shapes(inputs)
    ratio = inputs.relative_log_ratio()  # [B]
    relative_reward = eta * (inputs.reward - inputs.reward_prime)  # [B]
    return ((ratio - relative_reward) ** 2).mean()


def relative_log_ratio(
    logp: torch.Tensor, logp_prime: torch.Tensor, logp_t: torch.Tensor, logp_t_prime: torch.Tensor
) -> torch.Tensor:
    """(ln π(y|s_h) − ln π_t(y|s_h)) − (ln π(y'|s_h) − ln π_t(y'|s_h)), ``[B]`` nats.

    Args:
        logp, logp_prime, logp_t, logp_t_prime: as in :class:`LossInputs`, ``[B]`` nats.
    """
    return (logp - logp_t) - (logp_prime - logp_t_prime)


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


def dpo_loss(inputs: LossInputs, beta: float) -> torch.Tensor:
    """DPO on reward-ranked pairs (the paper's DPO-LT baseline): the higher-reward reply is chosen.

    Per pair (Rafailov et al. 2023, Eq. 7, with π_t as the reference policy):

        −ln σ(β · sign(r − r') · ((ln π(y|s_h) − ln π_t(y|s_h)) − (ln π(y'|s_h) − ln π_t(y'|s_h))))

    Pairs with r = r' state no preference and are left out of the mean.

    Args:
        inputs: as in :func:`refuel_loss`, ``[B]`` each.
        beta: β, the inverse temperature of the implicit reward (per nat).

    Returns:
        Scalar loss (nats); 0 (still differentiable) when no pair has r ≠ r'.

    Raises:
        ValueError: the inputs do not all have the same shape ``[B]``.
    """
    _check_pair_shapes(inputs)
    ratio = inputs.relative_log_ratio()  # [B]
    preference = torch.sign(inputs.reward - inputs.reward_prime)  # [B]: +1 y chosen, −1 y' chosen, 0 tie
    losses = -torch.nn.functional.logsigmoid(beta * preference * ratio)  # [B]
    informative = preference != 0
    return (losses * informative).sum() / informative.sum().clamp(min=1)


def _check_pair_shapes(inputs: LossInputs) -> None:
    shapes = {tuple(t.shape) for t in inputs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"all pair-loss inputs must share one shape [B]; got shapes {sorted(shapes)}")
