"""Pair records: turn-h token ids and reply masks, the padded batch layout, π_t log-probs, pairs.jsonl."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dialogsim.backends.transformers_backend import chat_prompt_ids, load_tokenizer
from dialogsim.messages import Message
from refuel.config import RefuelConfig
from refuel.pairs import (
    SCORED_PAIR_FEATURES,
    TOKENIZED_PAIR_FEATURES,
    Pair,
    PairTokenizationError,
    ScoredPair,
    pad_pairs,
    read_tokenized_pairs,
    tokenize_pair,
)
from refuel.storage import read_rows, write_rows
from refuel.training.logprobs import masked_sequence_logprobs
from refuel.training.trainer import RefuelTrainer

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


def _record(tokenizer: PreTrainedTokenizerBase, reply: str = REPLY, reply_prime: str = REPLY_PRIME) -> Pair:
    """A pair as ``refuel.collection.collect.pair_record`` makes it, with reset turn h = 2."""
    dialogue, dialogue_prime = _dialogue(reply), _dialogue(reply_prime)
    return Pair(
        prompt_id="hand-1",
        turn=2,
        horizon=3,
        reset_source="current",
        offline_id="",
        snapshot_json=json.dumps({"messages": dialogue[:3]}),
        dialogue=dialogue,
        dialogue_prime=dialogue_prime,
        reward=1.0,
        reward_prime=0.0,
        prompt_token_ids=chat_prompt_ids(tokenizer, dialogue[:3]),
        token_ids=_reply_ids(tokenizer, reply),
        token_ids_prime=_reply_ids(tokenizer, reply_prime),
    )


def test_tokenize_pair_masks_exactly_the_turn_h_reply(tokenizer: PreTrainedTokenizerBase) -> None:
    """input_ids = chat-templated s_h + generated reply ids; the mask covers exactly those reply ids."""
    record = _record(tokenizer)
    features, stats = tokenize_pair(record, tokenizer)
    assert {key: features[key] for key in record} == record  # a new record: the pair's fields, then the features
    assert list(features) == list(TOKENIZED_PAIR_FEATURES)
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
        tokenize_pair(record, tokenizer)
    record = _record(tokenizer)
    record["prompt_token_ids"] = record["prompt_token_ids"][:-1]  # without the final newline of the gen prompt
    with pytest.raises(PairTokenizationError):
        tokenize_pair(record, tokenizer)


@pytest.mark.parametrize("suffix", ["", "_prime"])
def test_tokenize_pair_rejects_ids_that_do_not_decode_to_the_reply(
    tokenizer: PreTrainedTokenizerBase, suffix: str
) -> None:
    """Reply ids that do not decode to the turn-h reply text raise PairTokenizationError naming the side."""
    record = _record(tokenizer)
    record = record | {f"token_ids{suffix}": _reply_ids(tokenizer, "Something else entirely.")}
    with pytest.raises(PairTokenizationError, match=f"token_ids{suffix} do not decode"):
        tokenize_pair(record, tokenizer)


def _rows(tokenizer: PreTrainedTokenizerBase) -> list[ScoredPair]:
    """Three scored pairs of different lengths with distinct rewards and fake π_t log-probs."""
    replies = [("Yes.", "No, it is 43 because 12 + 31 = 43."), (REPLY, REPLY_PRIME), ("42", "I think 41 or maybe 40.")]
    rows = []
    for index, (reply, reply_prime) in enumerate(replies):
        record = _record(tokenizer, reply, reply_prime) | {"reward": float(index), "reward_prime": -float(index) - 0.5}
        tokenized, _ = tokenize_pair(record, tokenizer)
        rows.append(ScoredPair(**tokenized, logp_t=-10.0 - index, logp_t_prime=-20.0 - index))
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
    assert batch["logp_t"].tolist() == [-10.0, -11.0, -12.0, -20.0, -21.0, -22.0]
    # tokenised pairs without π_t log-probs (before the trainer scores them) collate without a logp_t entry
    bare = [{k: v for k, v in row.items() if not k.startswith("logp_t")} for row in rows]
    assert "logp_t" not in pad_pairs(bare, pad)


def test_trainer_logp_t_equal_per_row_masked_logprobs(
    tokenizer: PreTrainedTokenizerBase, tiny_model_path: str, tiny_model: PreTrainedModel, tmp_path: Path
) -> None:
    """The trainer's π_t log-probs (separate layout, micro-batches of 2) equal masked_sequence_logprobs of each
    sequence alone, and come as new records in the given order."""
    tokenized = [{k: v for k, v in row.items() if not k.startswith("logp_t")} for row in _rows(tokenizer)]
    config = RefuelConfig(
        output_dir=str(tmp_path),
        temperature=0.8,
        per_device_batch_size=2,
        gradient_accumulation_steps=1,
        pair_layout="separate",
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    rows = RefuelTrainer(config, model, tokenizer, tokenized, []).pairs["train"]
    assert [{k: v for k, v in row.items() if not k.startswith("logp_t")} for row in rows] == tokenized
    assert all("logp_t" not in row for row in tokenized)  # the given records are left as they were
    values = [(row["logp_t"], row["logp_t_prime"]) for row in rows]
    assert len(values) == len(rows)
    for row, (logp_t, logp_t_prime) in zip(rows, values, strict=True):
        for ids, mask, value in (
            (row["input_ids"], row["loss_mask"], logp_t),
            (row["input_ids_prime"], row["loss_mask_prime"], logp_t_prime),
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


def test_pairs_jsonl_is_written_with_its_schema_and_read_back_from_either_log_prob_name(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Scored pairs round-trip through SCORED_PAIR_FEATURES; reading tokenised pairs leaves π_t's log-probs out,
    under their name or the ``ref_logp`` name of runs written before the rename."""
    rows = _rows(tokenizer)
    path = write_rows(rows, tmp_path / "pairs.jsonl", SCORED_PAIR_FEATURES)
    assert read_rows(path, SCORED_PAIR_FEATURES) == rows
    tokenized = [{k: v for k, v in row.items() if not k.startswith("logp_t")} for row in rows]
    assert read_tokenized_pairs(path) == tokenized
    legacy = [
        {k: v for k, v in row.items() if not k.startswith("logp_t")}
        | {"ref_logp": row["logp_t"], "ref_logp_prime": row["logp_t_prime"]}
        for row in rows
    ]
    assert read_tokenized_pairs(write_rows(legacy, tmp_path / "old.jsonl")) == tokenized
    with pytest.raises(ValueError, match=r"row 0 .* its schema the columns"):
        write_rows(legacy, tmp_path / "bad.jsonl", SCORED_PAIR_FEATURES)
