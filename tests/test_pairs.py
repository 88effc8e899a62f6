"""Pair records: turn-h token ids and reply masks, the records with π_t log-probs, pairs.jsonl."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from dialogsim.backends.transformers_backend import chat_prompt_ids, load_tokenizer
from dialogsim.messages import Message
from refuel.pairs import (
    SCORED_PAIR_FEATURES,
    TOKENIZED_PAIR_FEATURES,
    Pair,
    PairTokenizationError,
    ScoredPair,
    read_tokenized_pairs,
    tokenize_pair,
)
from refuel.storage import read_rows, write_rows

REPLY = "Yes: 12 + 30 = 42, so the answer is 42."
REPLY_PRIME = "No, I made a mistake. It is 43."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer and chat template (from the tiny model's folder)."""
    return load_tokenizer(tiny_model_path)


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
