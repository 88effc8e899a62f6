"""Sequence log-probabilities of masked reply tokens under a causal LM."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def masked_sequence_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Sum of ln π(token | prefix) over the tokens where ``loss_mask`` is 1.

    The logits are divided by the sampling ``temperature`` first, so the log-probabilities are those
    of the distribution the replies were sampled from (as in the REFUEL/REBEL public code).

    Args:
        model: causal LM.
        input_ids: ``[B, T]`` token ids (right-padded).
        attention_mask: ``[B, T]`` 1 on real tokens.
        loss_mask: ``[B, T]`` 1 on the turn-h reply tokens.
        temperature: sampling temperature (> 0).

    Returns:
        ``[B]`` log-probabilities in nats.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    hidden_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    selected = loss_mask[:, 1:].bool()  # [B, T-1]: positions whose next token is a reply token
    logits = hidden_logits[:, :-1][selected].float() / temperature  # [N, V], N = reply tokens in batch
    targets = input_ids[:, 1:][selected]  # [N]
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [N]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(selected)[selected]
    return torch.zeros(input_ids.shape[0], dtype=token_logp.dtype, device=token_logp.device).index_add(
        0, rows, token_logp
    )  # [B]
