"""Turn collected pairs into training features: token ids, turn-h reply masks, π_t log-probs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dialogsim.backends.transformers_backend import chat_prompt_ids
from refuel.logprobs import masked_sequence_logprobs


class PairTokenizationError(ValueError):
    """A pair's stored token ids disagree with the policy's chat template or its reply text."""


def tokenize_pair(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, stats: Counter[str]) -> dict[str, Any]:
    """Token ids of s_h + each turn-h reply and the mask of the reply tokens.

    The ids are the ones π_t actually saw and generated: the chat-templated s_h (re-rendered here and
    checked against the ids stored at generation time) followed by the generated reply ids. Whether
    re-tokenising the reply text gives the same ids is counted in ``stats["retokenization_match"]``
    / ``stats["retokenization_mismatch"]`` (byte-level BPE need not be canonical on sampled text).

    Returns:
        ``input_ids``, ``loss_mask``, ``input_ids_prime``, ``loss_mask_prime`` (lists, ``[T]`` each).

    Raises:
        PairTokenizationError: the chat template renders s_h to other ids than were generated from,
            or a reply's ids do not decode to the reply text in the dialogue.
    """
    turn = record["turn"]
    state = record["dialogue"][: 2 * turn - 1]  # s_h: up to and including the h-th user message
    prompt_ids = chat_prompt_ids(tokenizer, state)
    if prompt_ids != list(record["prompt_token_ids"]):
        raise PairTokenizationError(
            f"pair of prompt {record['prompt_id']} turn {turn}: the policy's chat template renders s_h to "
            f"{len(prompt_ids)} ids that differ from the {len(record['prompt_token_ids'])} ids the reply was "
            "generated from; collect and train with the same tokenizer"
        )
    features: dict[str, Any] = {}
    for suffix in ("", "_prime"):
        reply_ids = list(record["token_ids" + suffix])
        dialogue = record["dialogue" + suffix]
        if tokenizer.decode(reply_ids, skip_special_tokens=True) != dialogue[2 * turn - 1]["content"]:
            raise PairTokenizationError(
                f"pair of prompt {record['prompt_id']} turn {turn}: token_ids{suffix} do not decode to the "
                f"turn-{turn} reply text of dialogue{suffix}"
            )
        input_ids = prompt_ids + reply_ids
        rendered = tokenizer.apply_chat_template(dialogue[: 2 * turn], tokenize=True, return_dict=False)
        stats["retokenization_match" if rendered[: len(input_ids)] == input_ids else "retokenization_mismatch"] += 1
        features["input_ids" + suffix] = input_ids
        features["loss_mask" + suffix] = [0] * len(prompt_ids) + [1] * len(reply_ids)
    return features


def pad_pairs(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Collate pairs into one right-padded batch: the B replies y, then the B replies y'.

    Returns:
        ``input_ids``, ``attention_mask``, ``loss_mask`` ``[2B, T]``; ``ref_logp``, ``reward`` ``[2B]``
        when present in the rows.
    """
    sequences = [row["input_ids"] for row in rows] + [row["input_ids_prime"] for row in rows]
    masks = [row["loss_mask"] for row in rows] + [row["loss_mask_prime"] for row in rows]
    length = max(len(sequence) for sequence in sequences)
    batch = {
        "input_ids": torch.tensor([s + [pad_token_id] * (length - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences]),
        "loss_mask": torch.tensor([m + [0] * (length - len(m)) for m in masks]),
        "reward": pair_values(rows, "reward"),
    }
    if "ref_logp" in rows[0]:
        batch["ref_logp"] = pair_values(rows, "ref_logp")
    return batch


def pair_values(rows: Sequence[dict[str, Any]], key: str) -> torch.Tensor:
    """``[2B]`` the rows' ``key`` values (of y), then their ``key + "_prime"`` values (of y'): the batch order."""
    return torch.tensor([row[key] for row in rows] + [row[key + "_prime"] for row in rows])


@torch.no_grad()
def reference_logprobs(
    model: PreTrainedModel,
    rows: list[dict[str, Any]],
    pad_token_id: int,
    temperature: float,
    batch_size: int = 4,
) -> list[tuple[float, float]]:
    """ln π_t(y|s_h) and ln π_t(y'|s_h) for every pair, computed once before the gradient steps.

    Args:
        model: π_t (the policy at the start of the iteration), in eval mode.
        rows: tokenised pairs (see :func:`tokenize_pair`).
        temperature: the sampling temperature of the replies.

    Returns:
        One ``(ref_logp, ref_logp_prime)`` per row, nats.
    """
    model.eval()
    values: list[tuple[float, float]] = []
    for start in tqdm(range(0, len(rows), batch_size), desc="π_t log-probs", unit="batch"):
        chunk = rows[start : start + batch_size]
        batch = pad_pairs(chunk, pad_token_id)
        logp = masked_sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], temperature
        )  # [2B]
        values += list(zip(logp[: len(chunk)].tolist(), logp[len(chunk) :].tolist(), strict=True))
    return values
