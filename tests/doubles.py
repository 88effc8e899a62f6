"""Test doubles and builders shared by several test modules (and ``scripts/gpu_check.py``), one name each.

Backends (the ``chat(conversations, sampling) -> [Completion]`` contract):

- :class:`AnsweringBackend`: answers each conversation with ``answer(last message text)``, no model.
- :class:`FixedRepliesBackend`: returns the same fixed replies on every call, no model.
- :class:`RecordingBackend`: wraps a real backend and records every call (conversations, sampling, completions).

Rewards: :class:`LengthReward`, the length of the last message. Builders: :func:`tiny_llama_config` (the
random-initialised test models), :func:`first_rows` (rows of the shared prompt file),
:func:`make_pairs` (hand-made tokenised pairs for the trainer).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.backends.transformers_backend import chat_prompt_ids
from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.sampling import SamplingParams
from refuel.pairs import TokenizedPair

# --- backends -------------------------------------------------------------------------------------


class AnsweringBackend:
    """Answers every conversation with ``answer(text of its last message)`` and records those texts."""

    def __init__(self, answer: Callable[[str], str]) -> None:
        self.answer = answer
        self.prompts: list[str] = []

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        self.prompts += [conversation[-1]["content"] for conversation in conversations]
        return [Completion(self.answer(c[-1]["content"]), (), (), "stop") for c in conversations]


class FixedRepliesBackend:
    """Returns one completion per fixed reply on every call, whatever it is asked; records the calls."""

    name = "scripted"

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.calls: list[tuple[list[list[Message]], SamplingParams]] = []

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        self.calls.append((conversations, sampling))
        return [
            Completion(text=reply, token_ids=(1,), prompt_token_ids=(1,), finish_reason="stop")
            for reply in self.replies
        ]


@dataclass
class ChatCall:
    """One recorded ``chat`` call."""

    conversations: list[list[Message]]
    sampling: SamplingParams
    completions: list[Completion]


class RecordingBackend:
    """Delegates to a real backend and records every ``chat`` call (a deep copy of its conversations)."""

    def __init__(self, inner: ChatBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[ChatCall] = []

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        completions = self.inner.chat(conversations, sampling)
        self.calls.append(ChatCall(copy.deepcopy(conversations), sampling, completions))
        return completions

    def turns(self) -> list[list[int]]:
        """Per call, the turn index h (the number of user messages) of every conversation."""
        return [
            [sum(message["role"] == "user" for message in conversation) for conversation in call.conversations]
            for call in self.calls
        ]


# --- rewards --------------------------------------------------------------------------------------


class LengthReward:
    """Reward: the length of the last message; NaN when it is ``"nan"``; records the dialogues of each call."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.calls: list[list[list[Message]]] = []

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        self.calls.append(dialogues)
        return [math.nan if d[-1]["content"] == "nan" else float(len(d[-1]["content"])) for d in dialogues]


# --- builders -------------------------------------------------------------------------------------


def tiny_llama_config(tokenizer: Any, **overrides: Any) -> Any:
    """A 2-layer, 32-wide Llama config for ``tokenizer`` (random-initialised test models)."""
    from transformers import LlamaConfig

    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return LlamaConfig(**(settings | overrides))


def first_rows(path: Path, count: int, **where: str) -> list[PromptRow]:
    """The first ``count`` rows of a prompt file whose fields equal ``where`` (e.g. ``dataset="gsm8k"``)."""
    rows: list[PromptRow] = []
    with path.open() as handle:
        for line in handle:
            record = json.loads(line)
            if all(record[key] == value for key, value in where.items()):
                fields = {key: record[key] for key in ("id", "task", "dataset", "instruction", "reference", "split")}
                rows.append(PromptRow(**fields, meta=record["meta"]))
            if len(rows) == count:
                return rows
    raise AssertionError(f"fewer than {count} rows with {where} in {path}")


def make_pairs(tokenizer: PreTrainedTokenizerBase, count: int) -> list[TokenizedPair]:
    """``count`` tokenised pairs: s_1 + reply ids + eos, masks on the replies, r − r' alternating 1 and −1.5."""
    rows = []
    for index in range(count):
        # a one-word system prompt replaces the template's long default one: short sequences train fast
        state = [{"role": "system", "content": "Math."}, {"role": "user", "content": f"{index} + 7?"}]
        prompt = chat_prompt_ids(tokenizer, state)
        replies = [f"{index + 7}", f"Maybe {index + 8}."]
        ids = [[*tokenizer(reply, add_special_tokens=False).input_ids, tokenizer.eos_token_id] for reply in replies]
        rewards = (1.0, 0.0) if index % 2 == 0 else (0.0, 1.5)
        rows.append(
            TokenizedPair(
                prompt_id=f"hand-{index}",
                turn=1,
                horizon=1,
                reset_source="current",
                offline_id="",
                snapshot_json="{}",
                dialogue=[*state, {"role": "assistant", "content": replies[0]}],
                dialogue_prime=[*state, {"role": "assistant", "content": replies[1]}],
                reward=rewards[0],
                reward_prime=rewards[1],
                prompt_token_ids=prompt,
                token_ids=ids[0],
                token_ids_prime=ids[1],
                input_ids=prompt + ids[0],
                loss_mask=[0] * len(prompt) + [1] * len(ids[0]),
                input_ids_prime=prompt + ids[1],
                loss_mask_prime=[0] * len(prompt) + [1] * len(ids[1]),
            )
        )
    return rows
