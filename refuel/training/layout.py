"""Micro-batches of REFUEL pairs: which pairs share one, the tensors they become, and their log-probs.

A REFUEL pair is two sequences that share the state s_h: ``s_h + y`` and ``s_h + y'``; the loss needs
ln π(y|s_h) and ln π(y'|s_h), sums over the turn-h reply tokens only. Three steps take tokenised pairs
(:class:`~refuel.pairs.TokenizedPair`, or :class:`~refuel.pairs.ScoredPair` once π_t's log-probs are known)
to those ``[2B]`` values:

1. :func:`plan_micro_batches` fixes, once per iteration, which pairs share a micro-batch (step groups of
   similar length). π_t's log-probs and the trained policy's log-probs must come from identical
   computations, or the relative log-ratio is not 0 before the first step: in bf16 a pair's log-prob moves
   by up to 0.3 nats with the padding and company of its micro-batch (README "Training path"). So π_t's
   log-probs, validation and every epoch's steps run on the same micro-batches.
2. :func:`collate` lays a micro-batch out as one :class:`PairBatch`, in either pair layout:

   - ``shared_prefix`` (the default): one ``[T]`` sequence per pair, ``T = P + max(|y| + |y'|)`` (P the
     longest s_h)::

         [pad … pad | s_h ][ y | y' | pad … ]
          left-padded to P   replies back to back, right-padded

     under a block attention mask: s_h is causal, y attends to s_h and to its own earlier tokens, y' likewise
     but never to y. Position ids restart at ``len(s_h)`` for y', so each reply sees exactly the positions and
     keys it would see alone: the log-probs equal the separate layout's (up to float rounding), and gradients
     flow through the single copy of s_h from both replies. Logits are computed from the last s_h position on
     only (``logits_to_keep``, the ``transformers`` argument of causal LMs): that position predicts y_0 and y'_0
     alike, the others the rest of the replies. Needs SDPA or eager attention (:data:`MASKED_ATTENTION`).
   - ``separate``: ``2B`` right-padded sequences, the B ``s_h + y`` then the B ``s_h + y'``, through the plain
     forward any causal LM takes (flash attention included); s_h runs twice and every position gets logits.

   Both layouts index the replies the same way (``targets``, ``target_mask``, ``predictor``: ``[2B, R]``),
   and carry r, r' and π_t's log-probs as ``[2B]``: the B replies y, then the B replies y'.
3. :func:`sequence_logprobs` runs the model on a batch and returns ln π(y|s_h) then ln π(y'|s_h), ``[2B]`` nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, cast, get_args, get_type_hints

import numpy as np
import torch
from transformers import PreTrainedModel

from refuel.config import TrainingConfig
from refuel.pairs import ScoredPair, TokenizedPair

# Attention implementations that take an arbitrary 4-D mask (bool for SDPA, additive float for eager).
MASKED_ATTENTION = ("sdpa", "eager")
PAIR_LAYOUTS: tuple[str, ...] = get_args(get_type_hints(TrainingConfig)["pair_layout"])  # the setting's choices

SplitPair = tuple[list[int], list[int], list[int]]  # s_h, y, y' token ids (split_pair)


def pair_length(row: dict[str, Any]) -> int:
    """Tokens of s_h and both replies of a tokenised pair (its shared-prefix length; the sort key of grouping)."""
    return len(row["input_ids"]) + sum(row["loss_mask_prime"])


def plan_micro_batches(
    rows: Sequence[dict[str, Any]], per_device: int, group_size: int, seed: int, by_length: bool
) -> list[list[int]]:
    """Row indices of each micro-batch, step group after step group.

    The pairs, in a seeded random order (then stably sorted by length when ``by_length``), are cut into
    groups of ``group_size`` pairs (the effective batch: per device × accumulation × processes), one optimizer
    step each, and every group into micro-batches of ``per_device`` pairs. Sorting puts pairs of similar length
    in one micro-batch, which cuts padding. :class:`~refuel.training.batching.StepGroupSampler` then visits the
    groups in a new order each epoch.

    Args:
        rows: tokenised pairs.
        per_device: pairs per micro-batch (the last micro-batch of the last group may be shorter).
        group_size: pairs per optimizer step, a multiple of ``per_device``.
        seed: seed of the random order that ties in length keep.
        by_length: sort pairs by :func:`pair_length` (longest first) before cutting.

    Returns:
        Micro-batches (lists of row indices); group g is micro-batches ``[g·k, (g+1)·k)`` with
        ``k = group_size / per_device`` (the last group may hold fewer).

    Raises:
        ValueError: ``per_device`` < 1 or ``group_size`` not a positive multiple of it.
    """
    if per_device < 1 or group_size < per_device or group_size % per_device:
        raise ValueError(f"group_size {group_size} must be a positive multiple of per_device {per_device}")
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    if by_length:
        order.sort(key=lambda index: -pair_length(rows[index]))
    micro_batches = []
    for start in range(0, len(order), group_size):
        group = order[start : start + group_size]
        micro_batches += [group[i : i + per_device] for i in range(0, len(group), per_device)]
    return micro_batches


@dataclass(frozen=True)
class PairBatch:
    """A micro-batch of B pairs laid out for one forward pass (see the module docstring).

    N is the number of model rows: B in the ``shared_prefix`` layout, 2B in the ``separate`` one.

    Attributes:
        layout: ``"shared_prefix"`` or ``"separate"`` (``TrainingConfig.pair_layout``).
        input_ids: ``[N, T]`` token ids.
        attention_mask: ``shared_prefix``: ``[B, 1, T, T]`` bool, True where query position i may attend to key
            position j; ``separate``: ``[2B, T]``, 1 on real tokens.
        position_ids: ``[B, T]`` positions (s_h from 0; y and y' each from ``len(s_h)``; 0 on padding) in the
            ``shared_prefix`` layout; ``None`` in the ``separate`` one (the model counts 0 … T − 1).
        logits_to_keep: K, how many of the last positions have their logits read: from the last token of s_h
            on (of the longest s_h in the ``shared_prefix`` layout, whose s_h are left-padded; of the shortest in
            the ``separate`` one).
        targets: ``[2B, R]`` the reply token ids (the B replies y, then the B replies y'; R the longest reply),
            padded with 0.
        target_mask: ``[2B, R]`` 1.0 on real reply tokens.
        predictor: ``[2B, R]`` for each reply token, the index among the K kept positions of the position that
            predicts it (in model row ``i mod N`` for reply i).
        reward: ``[2B]`` r of the B pairs, then r'.
        logp_t: ``[2B]`` ln π_t(y|s_h), then ln π_t(y'|s_h), nats; ``None`` for pairs without π_t's log-probs yet.
    """

    layout: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    logits_to_keep: int
    targets: torch.Tensor
    target_mask: torch.Tensor
    predictor: torch.Tensor
    reward: torch.Tensor
    logp_t: torch.Tensor | None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """The same pairs with every tensor on ``device`` (what ``accelerate``'s ``send_to_device`` calls)."""
        moved = {
            f.name: value.to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def split_pair(pair: TokenizedPair) -> SplitPair:
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


def pair_rewards(pairs: Sequence[TokenizedPair]) -> torch.Tensor:
    """``[2B]`` r of the B pairs, then r': the order of the replies in a batch."""
    return torch.tensor([pair["reward"] for pair in pairs] + [pair["reward_prime"] for pair in pairs])


def pair_logp_t(pairs: Sequence[TokenizedPair | ScoredPair]) -> torch.Tensor | None:
    """``[2B]`` ln π_t(y|s_h) of the B pairs, then ln π_t(y'|s_h), nats; ``None`` for pairs without them yet."""
    if "logp_t" not in pairs[0]:
        return None
    scored = cast(Sequence[ScoredPair], pairs)
    return torch.tensor([pair["logp_t"] for pair in scored] + [pair["logp_t_prime"] for pair in scored])


class _ModelInputs(NamedTuple):
    """What a layout feeds the model, and where its logits predict the replies (fields as in :class:`PairBatch`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    logits_to_keep: int
    predictor: torch.Tensor


def collate(pairs: Sequence[TokenizedPair | ScoredPair], layout: str, pad_token_id: int) -> PairBatch:
    """Lay out a micro-batch of tokenised pairs as one :class:`PairBatch` in ``layout``.

    Args:
        pairs: tokenised pairs (:class:`~refuel.pairs.TokenizedPair`), or ones with π_t's log-probs
            (:class:`~refuel.pairs.ScoredPair`, which then fill ``logp_t``).
        layout: ``"shared_prefix"`` or ``"separate"`` (see the module docstring).
        pad_token_id: id written on padding (never attended to, never a target).

    Raises:
        ValueError: an unknown ``layout``; an empty ``pairs``; a pair that :func:`split_pair` refuses.
    """
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f"pair layout must be one of {', '.join(PAIR_LAYOUTS)}, got {layout!r}")
    if not pairs:
        raise ValueError("collate needs at least one pair")
    split = [split_pair(pair) for pair in pairs]
    replies = [reply for _, reply, _ in split] + [reply_prime for _, _, reply_prime in split]  # 2B: y, then y'
    targets = torch.zeros((len(replies), max(len(reply) for reply in replies)), dtype=torch.long)  # [2B, R]
    target_mask = torch.zeros(targets.shape)  # [2B, R]
    for index, reply in enumerate(replies):
        targets[index, : len(reply)] = torch.tensor(reply)
        target_mask[index, : len(reply)] = 1.0
    inputs = (
        _shared_prefix_inputs(split, pad_token_id)
        if layout == "shared_prefix"
        else _separate_inputs(split, pad_token_id)
    )
    return PairBatch(
        layout=layout,
        **inputs._asdict(),
        targets=targets,
        target_mask=target_mask,
        reward=pair_rewards(pairs),
        logp_t=pair_logp_t(pairs),
    )


def _shared_prefix_inputs(split: list[SplitPair], pad_token_id: int) -> _ModelInputs:
    """One ``[s_h | y | y']`` row per pair under its block mask; logits from the last s_h position (P − 1) on."""
    prefix_length = max(len(prefix) for prefix, _, _ in split)
    replies_length = max(len(reply) + len(reply_prime) for _, reply, reply_prime in split)
    reply_length = max(max(len(reply), len(reply_prime)) for _, reply, reply_prime in split)
    total = prefix_length + replies_length
    batch = len(split)
    input_ids = torch.full((batch, total), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((batch, total), dtype=torch.long)
    segment = torch.full((batch, total), -1, dtype=torch.long)  # -1 padding, 0 s_h, 1 y, 2 y'
    predictor = torch.zeros((2, batch, reply_length), dtype=torch.long)  # [2, B, R]: y, then y'
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
            # token j of the reply is predicted by the position before it: the last s_h position for j = 0
            before = torch.arange(block - 1, block + len(ids) - 1)
            before[0] = prefix_length - 1
            predictor[k, b, : len(ids)] = before - (prefix_length - 1)
            block += len(ids)
    real = segment >= 0  # [B, T]
    causal = torch.ones(total, total, dtype=torch.bool).tril()  # [T, T]: key j ≤ query i
    same_block = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # [B, T(q), T(k)]
    block_mask = causal & same_block & real[:, None, :] & real[:, :, None]
    block_mask |= torch.eye(total, dtype=torch.bool) & ~real[:, :, None]  # padding queries see themselves only
    return _ModelInputs(
        input_ids=input_ids,
        attention_mask=block_mask[:, None],  # [B, 1, T, T]
        position_ids=position_ids,
        logits_to_keep=total - prefix_length + 1,
        predictor=predictor.reshape(2 * batch, reply_length),  # [2B, R]
    )


def _separate_inputs(split: list[SplitPair], pad_token_id: int) -> _ModelInputs:
    """The 2B right-padded sequences ``s_h + y``, then ``s_h + y'``; logits from the shortest s_h's last token on."""
    sequences = [prefix + reply for prefix, reply, _ in split] + [
        prefix + reply_prime for prefix, _, reply_prime in split
    ]
    prefixes = [len(prefix) for prefix, _, _ in split] * 2
    length = max(len(sequence) for sequence in sequences)
    first = min(prefixes) - 1  # the first position that predicts a reply token
    reply_length = max(len(sequence) - prefix for sequence, prefix in zip(sequences, prefixes, strict=True))
    predictor = torch.zeros((len(sequences), reply_length), dtype=torch.long)  # [2B, R]
    for index, (sequence, prefix) in enumerate(zip(sequences, prefixes, strict=True)):
        predictor[index, : len(sequence) - prefix] = torch.arange(prefix - 1, len(sequence) - 1) - first
    return _ModelInputs(
        input_ids=torch.tensor([s + [pad_token_id] * (length - len(s)) for s in sequences]),  # [2B, T]
        attention_mask=torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences]),  # [2B, T]
        position_ids=None,
        logits_to_keep=length - first,
        predictor=predictor,
    )


def sequence_logprobs(model: PreTrainedModel, batch: PairBatch, temperature: float) -> torch.Tensor:
    """ln π(y|s_h) of the B replies y, then of the B replies y', from one forward pass over ``batch``.

    The logits are divided by the sampling ``temperature`` before the log-softmax, so the log-probabilities
    are those of the distribution the replies were sampled from (as in the REFUEL/REBEL public code). Only
    the ``batch.logits_to_keep`` last positions are upcast and normalised (the ``shared_prefix`` layout has
    the model compute no other logits).

    Args:
        model: causal LM (also wrapped by DDP or ``peft``). For the ``shared_prefix`` layout its forward must
            take ``position_ids``, a 4-D ``attention_mask`` and ``logits_to_keep`` (``transformers`` causal LMs
            with SDPA or eager attention).
        batch: the micro-batch (:func:`collate`), on the model's device.
        temperature: sampling temperature (> 0).

    Returns:
        ``[2B]`` log-probabilities in nats (float32).

    Raises:
        ValueError: ``temperature`` ≤ 0, or a ``shared_prefix`` batch for an attention implementation that
            cannot take a 4-D mask.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    if batch.layout == "shared_prefix":
        attention = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
        if attention not in MASKED_ATTENTION:
            raise ValueError(
                f"the shared-prefix pair layout needs an attention implementation that takes a 4-D mask "
                f"({' or '.join(MASKED_ATTENTION)}), the model uses {attention!r}; load it with "
                "attn_implementation='sdpa' or set pair_layout separate"
            )
        mask = batch.attention_mask
        if attention == "eager":  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        logits = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=mask,
            logits_to_keep=batch.logits_to_keep,
        ).logits  # [B, K, V]
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [2B, T, V]
        logits = logits[:, -batch.logits_to_keep :]  # [2B, K, V]
    logits = logits.float() / temperature
    normaliser = torch.logsumexp(logits, dim=-1)  # [N, K]
    replies = batch.predictor.shape[0]
    rows = (torch.arange(replies, device=logits.device) % logits.shape[0])[:, None]  # [2B, 1]: reply i's model row
    chosen = logits[rows, batch.predictor, batch.targets] - normaliser[rows, batch.predictor]  # [2B, R]
    return (chosen * batch.target_mask).sum(-1)  # [2B]: the B replies y, then the B replies y'
