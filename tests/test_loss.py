"""The REFUEL and DPO losses and sign agreement on hand-written tensors."""

from __future__ import annotations

import math

import pytest
import torch

from refuel.training.loss import LossInputs, dpo_loss, refuel_loss, sign_agreement

# --- refuel_loss --------------------------------------------------------------------------------


def _inputs() -> LossInputs:
    """Two pairs of hand-picked log-probs (nats) and rewards."""
    return LossInputs(
        logp=torch.tensor([-1.0, -2.0]),
        logp_prime=torch.tensor([-3.0, -1.5]),
        logp_t=torch.tensor([-1.5, -2.0]),
        logp_t_prime=torch.tensor([-2.5, -1.0]),
        reward=torch.tensor([1.0, 0.0]),
        reward_prime=torch.tensor([0.0, 0.5]),
    )


def test_refuel_loss_equals_hand_computed_value() -> None:
    """The loss is the mean over pairs of (relative log-ratio − η(r − r'))²."""
    # η = 0.5
    # pair 1: Δ = (−1 − (−1.5)) − (−3 − (−2.5)) = 0.5 − (−0.5) = 1.0;  η(r − r') = 0.5 · (1 − 0)   =  0.5
    #         (1.0 − 0.5)²   = 0.25
    # pair 2: Δ = (−2 − (−2))   − (−1.5 − (−1)) = 0   − (−0.5) = 0.5;  η(r − r') = 0.5 · (0 − 0.5) = −0.25
    #         (0.5 + 0.25)²  = 0.5625
    # mean = (0.25 + 0.5625) / 2 = 0.40625
    loss = refuel_loss(_inputs(), eta=0.5)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(0.40625, abs=1e-7)


def test_loss_inputs_from_replies_follow_the_batch_order() -> None:
    """[2B] values in batch order (the B replies y, then the B replies y') give the six [B] inputs, in logp's dtype."""
    inputs = LossInputs.from_replies(
        logp=torch.tensor([-1.0, -2.0, -3.0, -1.5], dtype=torch.float64),
        logp_t=torch.tensor([-1.5, -2.0, -2.5, -1.0]),
        reward=torch.tensor([1.0, 0.0, 0.0, 0.5]),
    )
    for name, got, want in zip(LossInputs._fields, inputs, _inputs(), strict=True):
        torch.testing.assert_close(got, want.double(), msg=name)
    assert inputs.relative_log_ratio().tolist() == [1.0, 0.5]  # as in the hand computation below


def test_refuel_loss_is_zero_when_log_ratio_matches_scaled_reward() -> None:
    """Loss is 0 when (ln π/π_t)(y) − (ln π/π_t)(y') = η(r − r') for every pair."""
    eta = 2.0
    reward, reward_prime = torch.tensor([1.0, -0.5, 0.25]), torch.tensor([0.0, 0.5, 0.25])
    logp_t, logp_t_prime = torch.tensor([-4.0, -7.0, -1.0]), torch.tensor([-3.0, -2.0, -9.0])
    logp_prime = torch.tensor([-3.5, -2.5, -8.0])
    # choose ln π(y) so that the relative log-ratio is exactly η(r − r')
    logp = logp_t + (logp_prime - logp_t_prime) + eta * (reward - reward_prime)
    loss = refuel_loss(LossInputs(logp, logp_prime, logp_t, logp_t_prime, reward, reward_prime), eta)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    # and not zero once one pair is off by 0.5 nats: (0.5²) / 3
    inputs = LossInputs(logp + torch.tensor([0.5, 0, 0]), logp_prime, logp_t, logp_t_prime, reward, reward_prime)
    off = refuel_loss(inputs, eta)
    assert off.item() == pytest.approx(0.25 / 3, rel=1e-6)


def test_refuel_loss_is_symmetric_under_swapping_the_two_replies() -> None:
    """Swapping (y, r) with (y', r') negates the residual, so the loss is unchanged."""
    x = _inputs()
    swapped = LossInputs(x.logp_prime, x.logp, x.logp_t_prime, x.logp_t, x.reward_prime, x.reward)
    assert refuel_loss(swapped, eta=0.5).item() == pytest.approx(refuel_loss(x, eta=0.5).item(), abs=1e-7)


def test_refuel_loss_gradient_is_twice_the_residual_over_batch_size() -> None:
    """∂L/∂ln π(y) = 2(Δ − η(r − r'))/B and ∂L/∂ln π(y') is its negative."""
    x = _inputs()
    logp = x.logp.clone().requires_grad_(True)
    logp_prime = x.logp_prime.clone().requires_grad_(True)
    eta = 0.5
    refuel_loss(x._replace(logp=logp, logp_prime=logp_prime), eta=eta).backward()
    # residuals from the hand computation above: 1.0 − 0.5 = 0.5 and 0.5 − (−0.25) = 0.75; B = 2
    expected = torch.tensor([2 * 0.5 / 2, 2 * 0.75 / 2])
    torch.testing.assert_close(logp.grad, expected)
    torch.testing.assert_close(logp_prime.grad, -expected)
    # the same in closed form, for random inputs
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(5, generator=generator) for _ in range(6)]
    logp = values[0].clone().requires_grad_(True)
    refuel_loss(LossInputs(logp, *values[1:]), eta=3.0).backward()
    delta = (values[0] - values[2]) - (values[1] - values[3])
    torch.testing.assert_close(logp.grad, 2 * (delta - 3.0 * (values[4] - values[5])) / 5)


@pytest.mark.parametrize(
    "shapes",
    [
        [(2,), (2,), (2,), (2,), (2,), (3,)],  # one input longer
        [(2, 1)] * 6,  # not 1-D
        [()] * 6,  # scalars
    ],
)
def test_refuel_loss_rejects_mismatched_shapes(shapes: list[tuple[int, ...]]) -> None:
    """Inputs that are not all of one shape [B] raise ValueError."""
    with pytest.raises(ValueError, match="shape"):
        refuel_loss(LossInputs(*(torch.zeros(shape) for shape in shapes)), eta=1.0)


# --- sign_agreement -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "reward", "expected"),
    [
        ([1.0, -2.0, 0.5], [0.3, -1.0, 2.0], 1.0),  # all agree
        ([1.0, -2.0, 0.5, 3.0], [-0.3, 1.0, 2.0, 1.0], 0.5),  # 2 of 4 agree
        ([1.0, -2.0, 9.0], [1.0, 1.0, 0.0], 0.5),  # the tie (r = r') is left out: 1 of 2
        ([0.0, 0.0], [1.0, -1.0], 0.0),  # a zero log-ratio agrees with no sign
    ],
)
def test_sign_agreement_cases(ratio: list[float], reward: list[float], expected: float) -> None:
    """Sign agreement is the share of pairs with r ≠ r' whose log-ratio has the sign of r − r'."""
    assert sign_agreement(torch.tensor(ratio), torch.tensor(reward)) == pytest.approx(expected)


def test_sign_agreement_all_ties_is_nan() -> None:
    """Without any pair with r ≠ r' the agreement is undefined (NaN), not 0 or 1."""
    assert math.isnan(sign_agreement(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0])))


def test_dpo_loss_prefers_the_higher_reward_reply_and_skips_ties() -> None:
    """DPO: −ln σ(β·sign(r−r')·Δ) averaged over pairs with r ≠ r'; the gradient raises the chosen reply."""
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    logp_prime = torch.tensor([-1.5, -1.0, -3.0])
    ref = torch.tensor([-1.2, -1.8, -2.0])
    ref_prime = torch.tensor([-1.2, -1.1, -2.5])
    reward, reward_prime = torch.tensor([1.0, 0.2, 0.5]), torch.tensor([0.0, 0.7, 0.5])  # chosen: y, y', tie
    loss = dpo_loss(LossInputs(logp, logp_prime, ref, ref_prime, reward, reward_prime), beta=0.5)
    delta = (logp - ref) - (logp_prime - ref_prime)
    expected = -(torch.nn.functional.logsigmoid(0.5 * delta[0]) + torch.nn.functional.logsigmoid(-0.5 * delta[1])) / 2
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logp.grad[0] < 0 < logp.grad[1] and logp.grad[2] == 0  # descent: ln π(y) up in pair 0, down in 1
    all_ties = dpo_loss(LossInputs(logp, logp_prime, ref, ref_prime, reward, reward), beta=0.5)
    assert all_ties.item() == 0.0 and all_ties.requires_grad
