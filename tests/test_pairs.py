"""Pair features: turn-h token ids and reply masks, the padded batch layout, π_t log-probs."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dialogsim.backends.transformers_backend import chat_prompt_ids, load_tokenizer
from dialogsim.messages import Message
from refuel.logprobs import masked_sequence_logprobs
from refuel.pairs import PairTokenizationError, pad_pairs, reference_logprobs, tokenize_pair

REPLY = "Yes: 12 + 30 = 42, so the answer is 42."
REPLY_PRIME = "No, I made a mistake. It is 43."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer and chat template (from the tiny model's folder)."""
    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path: str) -> PreTrainedModel:
    """The tiny random Llama in fp32, eval mode."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def _dialogue(reply_at_turn_2: str) -> list[Message]:
    """A horizon-3 dialogue whose turn-2 reply is ``reply_at_turn_2``."""
    return [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "It is 42."},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": reply_at_turn_2},
        {"role": "user", "content": "Can you show the steps?"},
        {"role": "assistant", "content": "12 + 30: 2 + 0 = 2, 10 + 30 = 40, total 42."},
    ]


def _reply_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of a reply as a policy emits them: the text's tokens then the end-of-turn (eos) token."""
    return [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]


def _record(tokenizer: PreTrainedTokenizerBase, reply: str = REPLY, reply_prime: str = REPLY_PRIME) -> dict[str, Any]:
    """A pair record shaped like ``refuel.collect.pair_record`` with reset turn h = 2."""
    dialogue, dialogue_prime = _dialogue(reply), _dialogue(reply_prime)
    return {
        "prompt_id": "hand-1",
        "turn": 2,
        "horizon": 3,
        "snapshot_json": json.dumps({"messages": dialogue[:3]}),
        "dialogue": dialogue,
        "dialogue_prime": dialogue_prime,
        "reward": 1.0,
        "reward_prime": 0.0,
        "prompt_token_ids": chat_prompt_ids(tokenizer, dialogue[:3]),
        "token_ids": _reply_ids(tokenizer, reply),
        "token_ids_prime": _reply_ids(tokenizer, reply_prime),
    }


def test_tokenize_pair_masks_exactly_the_turn_h_reply(tokenizer: PreTrainedTokenizerBase) -> None:
    """input_ids = chat-templated s_h + generated reply ids; the mask covers exactly those reply ids."""
    record = _record(tokenizer)
    stats: Counter[str] = Counter()
    features = tokenize_pair(record, tokenizer, stats)
    prompt = record["prompt_token_ids"]
    for suffix, reply in (("", REPLY), ("_prime", REPLY_PRIME)):
        input_ids, mask = features["input_ids" + suffix], features["loss_mask" + suffix]
        reply_ids = record["token_ids" + suffix]
        assert input_ids == prompt + reply_ids
        assert len(mask) == len(input_ids)
        assert set(mask) == {0, 1}
        assert sum(mask) == len(reply_ids)
        assert mask == [0] * len(prompt) + [1] * len(reply_ids)  # one contiguous block at the end
        masked = [token for token, keep in zip(input_ids, mask, strict=True) if keep]
        assert masked == reply_ids
        assert tokenizer.decode(masked, skip_special_tokens=True) == reply
        # no token of s_h (including turn 1's reply "It is 42.") is in the loss
        unmasked = tokenizer.decode([t for t, keep in zip(input_ids, mask, strict=True) if not keep])
        assert unmasked.rstrip().endswith("assistant") and "Are you sure?" in unmasked and REPLY not in unmasked
    # both replies re-tokenise to the generated ids here (clean text + eos)
    assert stats == Counter({"retokenization_match": 2})


def test_tokenize_pair_rejects_prompt_ids_from_another_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Stored s_h ids that differ from the chat-templated s_h raise PairTokenizationError."""
    record = _record(tokenizer)
    record["prompt_token_ids"] = chat_prompt_ids(tokenizer, record["dialogue"][:1])  # s_1, not s_2
    with pytest.raises(PairTokenizationError, match="turn 2"):
        tokenize_pair(record, tokenizer, Counter())
    record = _record(tokenizer)
    record["prompt_token_ids"] = record["prompt_token_ids"][:-1]  # without the final newline of the gen prompt
    with pytest.raises(PairTokenizationError):
        tokenize_pair(record, tokenizer, Counter())


@pytest.mark.parametrize("suffix", ["", "_prime"])
def test_tokenize_pair_rejects_ids_that_do_not_decode_to_the_reply(
    tokenizer: PreTrainedTokenizerBase, suffix: str
) -> None:
    """Reply ids that do not decode to the turn-h reply text raise PairTokenizationError naming the side."""
    record = _record(tokenizer)
    record["token_ids" + suffix] = _reply_ids(tokenizer, "Something else entirely.")
    with pytest.raises(PairTokenizationError, match=f"token_ids{suffix} do not decode"):
        tokenize_pair(record, tokenizer, Counter())


def _rows(tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """Three tokenised pairs of different lengths with distinct rewards and fake π_t log-probs."""
    replies = [("Yes.", "No, it is 43 because 12 + 31 = 43."), (REPLY, REPLY_PRIME), ("42", "I think 41 or maybe 40.")]
    rows = []
    for index, (reply, reply_prime) in enumerate(replies):
        record = _record(tokenizer, reply, reply_prime)
        record |= tokenize_pair(record, tokenizer, Counter())
        record |= {"reward": float(index), "reward_prime": -float(index) - 0.5}
        record |= {"ref_logp": -10.0 - index, "ref_logp_prime": -20.0 - index}
        rows.append(record)
    return rows


def test_pad_pairs_layout(tokenizer: PreTrainedTokenizerBase) -> None:
    """pad_pairs gives [2B, T]: the B replies y, then the B replies y'; masks are 0 on the right padding."""
    rows = _rows(tokenizer)
    pad = tokenizer.pad_token_id
    batch = pad_pairs(rows, pad)
    sequences = [row["input_ids"] for row in rows] + [row["input_ids_prime"] for row in rows]
    masks = [row["loss_mask"] for row in rows] + [row["loss_mask_prime"] for row in rows]
    length = max(len(s) for s in sequences)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["loss_mask"].shape == (6, length)
    assert len({len(s) for s in sequences}) > 1  # the test really pads
    for index, (sequence, mask) in enumerate(zip(sequences, masks, strict=True)):
        n = len(sequence)
        assert batch["input_ids"][index, :n].tolist() == sequence
        assert batch["input_ids"][index, n:].eq(pad).all()
        assert batch["attention_mask"][index].tolist() == [1] * n + [0] * (length - n)
        assert batch["loss_mask"][index].tolist() == mask + [0] * (length - n)
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()
    assert batch["reward"].tolist() == [0.0, 1.0, 2.0, -0.5, -1.5, -2.5]
    assert batch["ref_logp"].tolist() == [-10.0, -11.0, -12.0, -20.0, -21.0, -22.0]
    # rows without π_t log-probs (before reference_logprobs) collate without a ref_logp entry
    bare = [{k: v for k, v in row.items() if not k.startswith("ref_logp")} for row in rows]
    assert "ref_logp" not in pad_pairs(bare, pad)


def test_reference_logprobs_equal_per_row_masked_logprobs(
    tokenizer: PreTrainedTokenizerBase, tiny_model: PreTrainedModel
) -> None:
    """reference_logprobs (batched in chunks of 2) equals masked_sequence_logprobs of each sequence alone."""
    rows = _rows(tokenizer)
    values = reference_logprobs(tiny_model, rows, tokenizer.pad_token_id, temperature=0.8, batch_size=2)
    assert len(values) == len(rows)
    for row, (ref_logp, ref_logp_prime) in zip(rows, values, strict=True):
        for ids, mask, value in (
            (row["input_ids"], row["loss_mask"], ref_logp),
            (row["input_ids_prime"], row["loss_mask_prime"], ref_logp_prime),
        ):
            with torch.no_grad():
                alone = masked_sequence_logprobs(
                    tiny_model,
                    torch.tensor([ids]),
                    torch.ones(1, len(ids), dtype=torch.long),
                    torch.tensor([mask]),
                    0.8,
                )
            assert value == pytest.approx(alone.item(), abs=1e-5)
    assert len({value for pair in values for value in pair}) == 2 * len(rows)  # y and y' are not mixed up
