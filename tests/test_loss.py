"""The REFUEL loss and sign agreement on hand-written tensors; masked sequence log-probs on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from refuel.training.logprobs import masked_sequence_logprobs
from refuel.training.loss import dpo_loss, refuel_loss, sign_agreement

# --- refuel_loss --------------------------------------------------------------------------------


def _inputs() -> dict[str, torch.Tensor]:
    """Two pairs of hand-picked log-probs (nats) and rewards."""
    return {
        "logp": torch.tensor([-1.0, -2.0]),
        "logp_prime": torch.tensor([-3.0, -1.5]),
        "logp_t": torch.tensor([-1.5, -2.0]),
        "logp_t_prime": torch.tensor([-2.5, -1.0]),
        "reward": torch.tensor([1.0, 0.0]),
        "reward_prime": torch.tensor([0.0, 0.5]),
    }


def test_refuel_loss_equals_hand_computed_value() -> None:
    """The loss is the mean over pairs of (relative log-ratio − η(r − r'))²."""
    # η = 0.5
    # pair 1: Δ = (−1 − (−1.5)) − (−3 − (−2.5)) = 0.5 − (−0.5) = 1.0;  η(r − r') = 0.5 · (1 − 0)   =  0.5
    #         (1.0 − 0.5)²   = 0.25
    # pair 2: Δ = (−2 − (−2))   − (−1.5 − (−1)) = 0   − (−0.5) = 0.5;  η(r − r') = 0.5 · (0 − 0.5) = −0.25
    #         (0.5 + 0.25)²  = 0.5625
    # mean = (0.25 + 0.5625) / 2 = 0.40625
    loss = refuel_loss(**_inputs(), eta=0.5)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(0.40625, abs=1e-7)


def test_refuel_loss_is_zero_when_log_ratio_matches_scaled_reward() -> None:
    """Loss is 0 when (ln π/π_t)(y) − (ln π/π_t)(y') = η(r − r') for every pair."""
    eta = 2.0
    reward, reward_prime = torch.tensor([1.0, -0.5, 0.25]), torch.tensor([0.0, 0.5, 0.25])
    logp_t, logp_t_prime = torch.tensor([-4.0, -7.0, -1.0]), torch.tensor([-3.0, -2.0, -9.0])
    logp_prime = torch.tensor([-3.5, -2.5, -8.0])
    # choose ln π(y) so that the relative log-ratio is exactly η(r − r')
    logp = logp_t + (logp_prime - logp_t_prime) + eta * (reward - reward_prime)
    loss = refuel_loss(logp, logp_prime, logp_t, logp_t_prime, reward, reward_prime, eta)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    # and not zero once one pair is off by 0.5 nats: (0.5²) / 3
    off = refuel_loss(logp + torch.tensor([0.5, 0, 0]), logp_prime, logp_t, logp_t_prime, reward, reward_prime, eta)
    assert off.item() == pytest.approx(0.25 / 3, rel=1e-6)


def test_refuel_loss_is_symmetric_under_swapping_the_two_replies() -> None:
    """Swapping (y, r) with (y', r') negates the residual, so the loss is unchanged."""
    x = _inputs()
    swapped = refuel_loss(
        x["logp_prime"], x["logp"], x["logp_t_prime"], x["logp_t"], x["reward_prime"], x["reward"], eta=0.5
    )
    assert swapped.item() == pytest.approx(refuel_loss(**x, eta=0.5).item(), abs=1e-7)


def test_refuel_loss_gradient_is_twice_the_residual_over_batch_size() -> None:
    """∂L/∂ln π(y) = 2(Δ − η(r − r'))/B and ∂L/∂ln π(y') is its negative."""
    x = _inputs()
    logp = x.pop("logp").clone().requires_grad_(True)
    logp_prime = x.pop("logp_prime").clone().requires_grad_(True)
    eta = 0.5
    refuel_loss(logp, logp_prime, **x, eta=eta).backward()
    # residuals from the hand computation above: 1.0 − 0.5 = 0.5 and 0.5 − (−0.25) = 0.75; B = 2
    expected = torch.tensor([2 * 0.5 / 2, 2 * 0.75 / 2])
    torch.testing.assert_close(logp.grad, expected)
    torch.testing.assert_close(logp_prime.grad, -expected)
    # the same in closed form, for random inputs
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(5, generator=generator) for _ in range(6)]
    logp = values[0].clone().requires_grad_(True)
    refuel_loss(logp, *values[1:], eta=3.0).backward()
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
        refuel_loss(*(torch.zeros(shape) for shape in shapes), eta=1.0)


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


# --- masked_sequence_logprobs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path: str) -> PreTrainedModel:
    """The tiny random Llama in fp32, eval mode."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    return model.eval()


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded sequences (lengths 7 and 5) with reply masks at different positions."""
    pad = 2
    input_ids = torch.tensor([[1, 520, 9531, 198, 19556, 665, 30], [1, 4093, 198, 6004, 11173, pad, pad]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]])
    return input_ids, attention_mask, loss_mask


def _manual_logprobs(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, t: float
) -> list[float]:
    """Σ over masked positions p of log_softmax(logits[p − 1] / T)[input_ids[p]], row by row, in float64."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()  # [B, T, V]
    logp = torch.log_softmax(logits / t, dim=-1)
    values = []
    for row in range(input_ids.shape[0]):
        total = 0.0
        for position in range(1, input_ids.shape[1]):
            if loss_mask[row, position]:
                total += logp[row, position - 1, input_ids[row, position]].item()
        values.append(total)
    return values


@torch.no_grad()
def test_masked_sequence_logprobs_equals_manual_computation(tiny_model: PreTrainedModel) -> None:
    """The batched, masked sum equals a token-by-token log_softmax(logits/T) gather for a padded batch."""
    input_ids, attention_mask, loss_mask = _padded_batch()
    for temperature in (1.0, 0.5):
        values = masked_sequence_logprobs(tiny_model, input_ids, attention_mask, loss_mask, temperature)
        assert values.shape == (2,)
        expected = _manual_logprobs(tiny_model, input_ids, attention_mask, loss_mask, temperature)
        assert values.tolist() == pytest.approx(expected, abs=1e-5)
        assert all(value < 0 for value in values.tolist())


@torch.no_grad()
def test_masked_sequence_logprobs_depends_on_temperature(tiny_model: PreTrainedModel) -> None:
    """Log-probs at T = 0.5 and T = 1 differ (the logits are divided by the temperature)."""
    batch = _padded_batch()
    at_one = masked_sequence_logprobs(tiny_model, *batch, temperature=1.0)
    at_half = masked_sequence_logprobs(tiny_model, *batch, temperature=0.5)
    assert (at_one - at_half).abs().min().item() > 1e-3


@pytest.mark.parametrize("temperature", [0.0, -0.8])
def test_masked_sequence_logprobs_rejects_non_positive_temperature(
    tiny_model: PreTrainedModel, temperature: float
) -> None:
    """T ≤ 0 raises ValueError instead of dividing by zero or flipping the distribution."""
    with pytest.raises(ValueError, match="temperature"):
        masked_sequence_logprobs(tiny_model, *_padded_batch(), temperature=temperature)


@torch.no_grad()
def test_masked_sequence_logprobs_unchanged_by_padding(tiny_model: PreTrainedModel) -> None:
    """A sequence's value in a right-padded batch equals its value computed alone (fp32, 1e-5)."""
    input_ids, attention_mask, loss_mask = _padded_batch()
    batched = masked_sequence_logprobs(tiny_model, input_ids, attention_mask, loss_mask, 0.8)
    for row, length in ((0, 7), (1, 5)):
        alone = masked_sequence_logprobs(
            tiny_model,
            input_ids[row : row + 1, :length],
            attention_mask[row : row + 1, :length],
            loss_mask[row : row + 1, :length],
            0.8,
        )
        assert alone.item() == pytest.approx(batched[row].item(), abs=1e-5)
    # a mask-free row contributes exactly 0
    empty = masked_sequence_logprobs(tiny_model, input_ids, attention_mask, torch.zeros_like(loss_mask), 0.8)
    assert empty.tolist() == [0.0, 0.0]


def test_dpo_loss_prefers_the_higher_reward_reply_and_skips_ties() -> None:
    """DPO: −ln σ(β·sign(r−r')·Δ) averaged over pairs with r ≠ r'; the gradient raises the chosen reply."""
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    logp_prime = torch.tensor([-1.5, -1.0, -3.0])
    ref = torch.tensor([-1.2, -1.8, -2.0])
    ref_prime = torch.tensor([-1.2, -1.1, -2.5])
    reward, reward_prime = torch.tensor([1.0, 0.2, 0.5]), torch.tensor([0.0, 0.7, 0.5])  # chosen: y, y', tie
    loss = dpo_loss(logp, logp_prime, ref, ref_prime, reward, reward_prime, beta=0.5)
    delta = (logp - ref) - (logp_prime - ref_prime)
    expected = -(torch.nn.functional.logsigmoid(0.5 * delta[0]) + torch.nn.functional.logsigmoid(-0.5 * delta[1])) / 2
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logp.grad[0] < 0 < logp.grad[1] and logp.grad[2] == 0  # descent: ln π(y) up in pair 0, down in 1
    all_ties = dpo_loss(logp, logp_prime, ref, ref_prime, reward, reward, beta=0.5)
    assert all_ties.item() == 0.0 and all_ties.requires_grad
