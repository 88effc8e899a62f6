"""Both replies of a pair after one copy of their shared state s_h: one sequence per pair, logits at replies only.

A REFUEL pair is two sequences that share s_h: ``s_h + y`` and ``s_h + y'``. The separate
layout (:func:`refuel.pairs.pad_pairs`) runs s_h twice and computes ``[2B, T, V]`` logits, although the loss
needs the turn-h reply positions only. The shared-prefix layout packs a micro-batch of B pairs as ``[B, T]``
with ``T = P + max(|y| + |y'|)`` (P the longest s_h)::

    [pad … pad | s_h ][ y | y' | pad … ]
     left-padded to P   replies back to back, right-padded

and a block attention mask: s_h is causal, y attends to s_h and to its own earlier tokens, y' likewise but
never to y. Position ids restart at ``len(s_h)`` for y', so each reply sees exactly the positions and keys it
would see alone: the log-probs equal the separate computation (up to float rounding), and gradients flow
through the single copy of s_h from both replies. Logits are computed from the last s_h position on only
(``logits_to_keep``, the ``transformers`` argument of causal LMs): that position predicts y_0 and y'_0
alike, the others the rest of the replies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from transformers import PreTrainedModel

from refuel.pairs import ScoredPair, TokenizedPair, pair_logp_t, pair_rewards

# Attention implementations that take an arbitrary 4-D mask (bool for SDPA, additive float for eager).
MASKED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class PackedPairs:
    """A micro-batch of B pairs in the shared-prefix layout (see the module docstring).

    Attributes:
        input_ids: ``[B, T]`` token ids, T = P + max(|y| + |y'|).
        position_ids: ``[B, T]`` positions (s_h from 0; y and y' each from ``len(s_h)``; 0 on padding).
        block_mask: ``[B, 1, T, T]`` bool, True where query position i may attend to key position j.
        targets: ``[B, 2, R]`` the reply token ids (y in row 0, y' in row 1; R the longest reply), padded with 0.
        target_mask: ``[B, 2, R]`` 1.0 on real reply tokens.
        predictor: ``[B, 2, R]`` for each reply token, the index among the kept logits (positions P − 1 …
            T − 1) of the position that predicts it.
        prefix_length: P, the padded length of the s_h block (tokens).
        reward: ``[2B]`` r of the B pairs, then r'.
        logp_t: ``[2B]`` ln π_t(y|s_h), then ln π_t(y'|s_h); ``None`` for pairs not scored yet.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    block_mask: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor
    predictor: torch.Tensor
    prefix_length: int
    reward: torch.Tensor
    logp_t: torch.Tensor | None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedPairs:
        """The same pairs with every tensor on ``device`` (what ``accelerate``'s ``send_to_device`` calls)."""
        moved = {
            f.name: value.to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def split_pair(pair: TokenizedPair) -> tuple[list[int], list[int], list[int]]:
    """s_h and the two reply id lists of a tokenised pair (see :func:`refuel.pairs.tokenize_pair`).

    Raises:
        ValueError: a loss mask is not zeros followed by ones (the reply must end the sequence), a reply is
            empty, or the two sequences do not share the s_h ids.
    """
    parts = []
    for mask_key, ids, mask in (
        ("loss_mask", pair["input_ids"], pair["loss_mask"]),
        ("loss_mask_prime", pair["input_ids_prime"], pair["loss_mask_prime"]),
    ):
        ids, mask = list(ids), list(mask)
        start = mask.index(1) if 1 in mask else len(mask)
        if len(ids) != len(mask) or start == len(mask) or start == 0 or any(m != 1 for m in mask[start:]):
            raise ValueError(
                f"{mask_key} must be 0 on s_h and 1 on the turn-h reply that ends the sequence "
                "(at least one token of each); tokenise pairs with refuel.pairs.tokenize_pair"
            )
        parts.append((ids[:start], ids[start:]))
    (prefix, reply), (prefix_prime, reply_prime) = parts
    if prefix != prefix_prime:
        raise ValueError("the two replies of a pair must follow the same s_h ids; tokenise with tokenize_pair")
    return prefix, reply, reply_prime


def pack_pairs(pairs: Sequence[TokenizedPair | ScoredPair], pad_token_id: int) -> PackedPairs:
    """Collate tokenised pairs into the shared-prefix layout (one ``[T]`` sequence per pair).

    Args:
        pairs: tokenised pairs (:class:`~refuel.pairs.TokenizedPair`), or scored ones
            (:class:`~refuel.pairs.ScoredPair`, whose π_t log-probs then fill ``logp_t``).
        pad_token_id: id written on padding (never attended to, never a target).

    Raises:
        ValueError: from :func:`split_pair`; an empty ``pairs``.
    """
    if not pairs:
        raise ValueError("pack_pairs needs at least one pair")
    split = [split_pair(pair) for pair in pairs]
    prefix_length = max(len(prefix) for prefix, _, _ in split)
    replies_length = max(len(reply) + len(reply_prime) for _, reply, reply_prime in split)
    reply_length = max(max(len(reply), len(reply_prime)) for _, reply, reply_prime in split)
    total = prefix_length + replies_length
    batch = len(pairs)
    input_ids = torch.full((batch, total), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((batch, total), dtype=torch.long)
    segment = torch.full((batch, total), -1, dtype=torch.long)  # -1 padding, 0 s_h, 1 y, 2 y'
    targets = torch.zeros((batch, 2, reply_length), dtype=torch.long)
    target_mask = torch.zeros((batch, 2, reply_length))
    predictor = torch.zeros((batch, 2, reply_length), dtype=torch.long)
    for b, (prefix, reply, reply_prime) in enumerate(split):
        start = prefix_length - len(prefix)
        input_ids[b, start:prefix_length] = torch.tensor(prefix)
        position_ids[b, start:prefix_length] = torch.arange(len(prefix))
        segment[b, start:prefix_length] = 0
        block = prefix_length
        for k, ids in enumerate((reply, reply_prime)):
            input_ids[b, block : block + len(ids)] = torch.tensor(ids)
            position_ids[b, block : block + len(ids)] = torch.arange(len(prefix), len(prefix) + len(ids))
            segment[b, block : block + len(ids)] = k + 1
            targets[b, k, : len(ids)] = torch.tensor(ids)
            target_mask[b, k, : len(ids)] = 1.0
            # token j of the reply is predicted by the position before it: the last s_h position for j = 0
            before = torch.arange(block - 1, block + len(ids) - 1)
            before[0] = prefix_length - 1
            predictor[b, k, : len(ids)] = before - (prefix_length - 1)
            block += len(ids)
    real = segment >= 0  # [B, T]
    causal = torch.ones(total, total, dtype=torch.bool).tril()  # [T, T]: key j ≤ query i
    same_block = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # [B, T(q), T(k)]
    block_mask = causal & same_block & real[:, None, :] & real[:, :, None]
    block_mask |= torch.eye(total, dtype=torch.bool) & ~real[:, :, None]  # padding queries see themselves only
    return PackedPairs(
        input_ids=input_ids,
        position_ids=position_ids,
        block_mask=block_mask[:, None],  # [B, 1, T, T]
        targets=targets,
        target_mask=target_mask,
        predictor=predictor,
        prefix_length=prefix_length,
        reward=pair_rewards(pairs),
        logp_t=pair_logp_t(pairs),
    )


def packed_pair_logprobs(model: PreTrainedModel, packed: PackedPairs, temperature: float) -> torch.Tensor:
    """ln π(y|s_h) of the B replies y, then of the B replies y', from one forward pass over the packed pairs.

    The logits are divided by the sampling ``temperature`` before the log-softmax (as in
    :func:`refuel.training.logprobs.masked_sequence_logprobs`) and only the positions from the last s_h token on get
    logits (``T − P + 1`` of them).

    Args:
        model: causal LM whose forward takes ``position_ids``, a 4-D ``attention_mask`` and ``logits_to_keep``
            (``transformers`` causal LMs with SDPA or eager attention; also wrapped by DDP or ``peft``).
        packed: the micro-batch (:func:`pack_pairs`), on the model's device.
        temperature: sampling temperature (> 0).

    Returns:
        ``[2B]`` log-probabilities in nats (float32).

    Raises:
        ValueError: ``temperature`` ≤ 0, or an attention implementation that cannot take a 4-D mask.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    attention = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if attention not in MASKED_ATTENTION:
        raise ValueError(
            f"the shared-prefix pair layout needs an attention implementation that takes a 4-D mask "
            f"({' or '.join(MASKED_ATTENTION)}), the model uses {attention!r}; load it with "
            "attn_implementation='sdpa' or set pair_layout separate"
        )
    mask = packed.block_mask
    if attention == "eager":  # eager attention adds the mask to the scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    kept = packed.input_ids.shape[1] - packed.prefix_length + 1
    logits = model(
        input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=mask, logits_to_keep=kept
    ).logits  # [B, K, V]: positions P − 1 … T − 1
    logits = logits.float() / temperature
    normaliser = torch.logsumexp(logits, dim=-1)  # [B, K]
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None, None]  # [B, 1, 1]
    chosen = logits[rows, packed.predictor, packed.targets] - normaliser[rows, packed.predictor]  # [B, 2, R]
    token_logp = (chosen * packed.target_mask).sum(-1)  # [B, 2]
    return token_logp.T.reshape(-1)  # [2B]: the B replies y, then the B replies y'
