"""The REFUEL pair record at each stage, its ``datasets`` schema, and its token ids and turn-h masks.

A pair is one reset state s_h, two turn-h replies y and y' of π_t, and the horizon rewards r and r'
of the two complete dialogues (REFUEL, Gao et al. 2025, Algorithm 1). Each stage returns a new,
larger record and never adds keys to the one it was given::

    refuel.collection.collect.pair_record   ─► Pair           shards/shard-<b>.jsonl       (PAIR_FEATURES)
    refuel.pairs.tokenize_pair              ─► TokenizedPair  pairs.jsonl before training  (TOKENIZED_PAIR_FEATURES)
    RefuelTrainer.compute_logp_t            ─► ScoredPair     pairs.jsonl after training   (SCORED_PAIR_FEATURES)

(:meth:`refuel.training.trainer.RefuelTrainer.compute_logp_t`: π_t's log-probs, the step of each iteration
before the gradient steps.)
The trainer collates micro-batches of them (:func:`refuel.training.layout.collate`) and feeds their
log-probs to :func:`refuel.training.loss.refuel_loss`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict, cast, get_type_hints

from datasets import Features, List, Value
from transformers import PreTrainedTokenizerBase

from dialogsim.backends.transformers_backend import chat_prompt_ids
from dialogsim.messages import Message
from refuel.storage import read_rows


class Pair(TypedDict):
    """One collected REFUEL pair (a row of a collection shard), built by :func:`refuel.collection.collect.pair_record`.

    Attributes:
        prompt_id: the prompt row the dialogues answer.
        turn: h, the reset turn (1 ≤ h ≤ H): y and y' are the h-th assistant replies.
        horizon: H, the turn after whose reply both dialogues are scored.
        reset_source: which part of the reset distribution s_h came from: ``"current"`` (roll-in with
            π_t), ``"initial"`` (roll-in with π_ref, the initial policy), ``"prompt"`` (a β prompt start), ``"dataset"``
            (an offline prefix).
        offline_id: the offline dialogue whose prefix s_h is, for ``"dataset"``; ``""`` otherwise.
        snapshot_json: the environment snapshot of s_h (JSON text).
        dialogue, dialogue_prime: the two complete dialogues (2H messages each), equal up to s_h.
        reward, reward_prime: r and r', the reward model's scores of the two dialogues.
        prompt_token_ids: ids of the chat-templated s_h that y and y' were generated from.
        token_ids, token_ids_prime: the generated ids of y and y'.
    """

    prompt_id: str
    turn: int
    horizon: int
    reset_source: str
    offline_id: str
    snapshot_json: str
    dialogue: list[Message]
    dialogue_prime: list[Message]
    reward: float
    reward_prime: float
    prompt_token_ids: list[int]
    token_ids: list[int]
    token_ids_prime: list[int]


class TokenizedPair(Pair):
    """A :class:`Pair` with the two training sequences ``s_h + y`` and ``s_h + y'`` (see :func:`tokenize_pair`).

    Attributes:
        input_ids, input_ids_prime: ``[T]`` ``prompt_token_ids`` followed by ``token_ids`` (``token_ids_prime``).
        loss_mask, loss_mask_prime: ``[T]`` 0 on s_h, 1 on the turn-h reply tokens.
    """

    input_ids: list[int]
    loss_mask: list[int]
    input_ids_prime: list[int]
    loss_mask_prime: list[int]


class ScoredPair(TokenizedPair):
    """A :class:`TokenizedPair` with π_t's log-probs of its replies, computed once before the gradient steps.

    Attributes:
        logp_t, logp_t_prime: ln π_t(y|s_h) and ln π_t(y'|s_h), nats, at the sampling temperature.
    """

    logp_t: float
    logp_t_prime: float


_ARROW_TYPES: dict[Any, Any] = {
    str: Value("string"),
    int: Value("int64"),
    float: Value("float64"),
    list[int]: List(Value("int64")),
    list[Message]: List({"role": Value("string"), "content": Value("string")}),
}


def _features(record: type) -> Features:
    """The ``datasets`` schema of a record type, column for key, in the declared order."""
    return Features({key: _ARROW_TYPES[hint] for key, hint in get_type_hints(record).items()})


PAIR_FEATURES = _features(Pair)
TOKENIZED_PAIR_FEATURES = _features(TokenizedPair)
SCORED_PAIR_FEATURES = _features(ScoredPair)


# π_t's log-prob columns of a pairs.jsonl after training: ``logp_t`` and, in runs written before the
# rename, ``ref_logp`` (both with their ``_prime`` twins).
LOGP_T_COLUMNS = ("logp_t", "logp_t_prime", "ref_logp", "ref_logp_prime")


def read_tokenized_pairs(path: Path) -> list[TokenizedPair]:
    """The tokenised pairs of a ``pairs.jsonl``, whether written before or after training.

    π_t's log-probs that a finished training added (:data:`LOGP_T_COLUMNS`, the old names included) are
    left out: the trainer computes them again, on its own micro-batches.
    """
    rows = read_rows(path)
    return [cast(TokenizedPair, {k: v for k, v in row.items() if k not in LOGP_T_COLUMNS}) for row in rows]


class PairTokenizationError(ValueError):
    """A pair's stored token ids disagree with the policy's chat template or its reply text."""


def tokenize_pair(pair: Pair, tokenizer: PreTrainedTokenizerBase) -> tuple[TokenizedPair, Counter[str]]:
    """The pair with the token ids of s_h + each turn-h reply and the mask of the reply tokens.

    The ids are the ones π_t actually saw and generated: the chat-templated s_h (re-rendered here and
    checked against the ids stored at generation time) followed by the generated reply ids. Whether
    re-tokenising the reply text gives the same ids is counted, per reply, as ``retokenization_match``
    or ``retokenization_mismatch`` (byte-level BPE need not be canonical on sampled text).

    Returns:
        A new :class:`TokenizedPair` (``input_ids``, ``loss_mask`` and their ``_prime`` twins, ``[T]``
        each) and the re-tokenisation counts of its two replies.

    Raises:
        PairTokenizationError: the chat template renders s_h to other ids than were generated from,
            or a reply's ids do not decode to the reply text in the dialogue.
    """
    turn = pair["turn"]
    state = pair["dialogue"][: 2 * turn - 1]  # s_h: up to and including the h-th user message
    prompt_ids = chat_prompt_ids(tokenizer, state)
    if prompt_ids != list(pair["prompt_token_ids"]):
        raise PairTokenizationError(
            f"pair of prompt {pair['prompt_id']} turn {turn}: the policy's chat template renders s_h to "
            f"{len(prompt_ids)} ids that differ from the {len(pair['prompt_token_ids'])} ids the reply was "
            "generated from; collect and train with the same tokenizer"
        )
    counts: Counter[str] = Counter()
    sequences = []
    for (ids_key, reply_ids), (dialogue_key, dialogue) in (
        (("token_ids", pair["token_ids"]), ("dialogue", pair["dialogue"])),
        (("token_ids_prime", pair["token_ids_prime"]), ("dialogue_prime", pair["dialogue_prime"])),
    ):
        if tokenizer.decode(reply_ids, skip_special_tokens=True) != dialogue[2 * turn - 1]["content"]:
            raise PairTokenizationError(
                f"pair of prompt {pair['prompt_id']} turn {turn}: {ids_key} do not decode to the "
                f"turn-{turn} reply text of {dialogue_key}"
            )
        input_ids = prompt_ids + list(reply_ids)
        rendered = tokenizer.apply_chat_template(dialogue[: 2 * turn], tokenize=True, return_dict=False)
        counts["retokenization_match" if rendered[: len(input_ids)] == input_ids else "retokenization_mismatch"] += 1
        sequences.append((input_ids, [0] * len(prompt_ids) + [1] * len(reply_ids)))
    (input_ids, loss_mask), (input_ids_prime, loss_mask_prime) = sequences
    tokenized = TokenizedPair(
        **pair,
        input_ids=input_ids,
        loss_mask=loss_mask,
        input_ids_prime=input_ids_prime,
        loss_mask_prime=loss_mask_prime,
    )
    return tokenized, counts


def tokenize_pairs(
    pairs: Sequence[Pair], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[TokenizedPair], Counter[str]]:
    """:func:`tokenize_pair` of every pair, and the re-tokenisation counts summed over them."""
    tokenized, counts = [], Counter[str]()
    for pair in pairs:
        features, pair_counts = tokenize_pair(pair, tokenizer)
        tokenized.append(features)
        counts.update(pair_counts)
    return tokenized, counts
