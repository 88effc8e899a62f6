"""Per-turn diagnostics on constructed dialogues: copying, accuracy, format, tests, fallback, token lengths."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from transformers import PreTrainedTokenizerBase

from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.math_format import copy_rate
from dialogsim.user import FALLBACK_QUESTION
from refuel.evaluation.diagnostics import (
    DIAGNOSTIC_COLUMNS,
    TurnDiagnostics,
    diagnostics_frame,
    policy_diagnostics,
    requested_format,
    save_diagnostics,
)

MATH_INSTRUCTION = (
    "Solve the following math problem step-by-step.\n"
    "Simplify your answer as much as possible. Present your final answer as \\boxed{Your Answer}.\n"
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
CODE_INSTRUCTION = (
    "Write Python code to solve the task.\n"
    "Write a Python function `add(a, b)` to solve the following problem: Present code in ```python```\n"
    "Write a function that adds two numbers.\n>>> assert add(1, 2) == 3"
)
LOGIC_INSTRUCTION = (
    "Solve the following problem step-by-step:\nWere Scott Derrickson and Ed Wood of the same nationality?"
)
ROWS = {
    "math": PromptRow(id="math", task="Math_CoT", dataset="gsm8k", instruction=MATH_INSTRUCTION, reference="72"),
    "code": PromptRow(
        id="code",
        task="Coding",
        dataset="mbpp",
        instruction=CODE_INSTRUCTION,
        reference="assert add(1, 2) == 3\nassert add(-1, 1) == 0",
        meta={"entry_point": "add"},
    ),
    "logic": PromptRow(id="logic", task="Logic", dataset="hotpotqa", instruction=LOGIC_INSTRUCTION, reference="yes"),
}
CORRECT = "In May she sold 48 / 2 = 24 clips, so altogether 48 + 24 = 72 clips.\n\\boxed{72}"
WRONG = "She sold 48 + 48 = 96 clips. The answer is 96."
PASSING_CODE = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"


class LastReplyLength:
    """Reward stub (a dependency, not the thing under test): characters of the last reply; NaN for Logic rows."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        return [
            math.nan if row.task == "Logic" else float(len(d[-1]["content"]))
            for d, row in zip(dialogues, rows, strict=True)
        ]


def dialogue(*turns: tuple[str, str]) -> list[Message]:
    """Messages from (user message, assistant reply) pairs."""
    return [
        message
        for user, reply in turns
        for message in ({"role": "user", "content": user}, {"role": "assistant", "content": reply})
    ]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(smollm2_path)


def diagnose(
    dialogues: dict[str, list[Message]], tokenizer: PreTrainedTokenizerBase, horizon: int = 1
) -> list[TurnDiagnostics]:
    return policy_diagnostics("policy", dialogues, ROWS, horizon, reward=LastReplyLength(), tokenizer=tokenizer)


def test_a_copy_of_the_prompt_scores_copy_rate_one(tokenizer: PreTrainedTokenizerBase) -> None:
    assert copy_rate(MATH_INSTRUCTION, MATH_INSTRUCTION) == 1.0
    assert copy_rate(CORRECT, MATH_INSTRUCTION) == 0.0
    assert copy_rate("Natalia sold clips", MATH_INSTRUCTION) == 0.0  # fewer than 4 words: no 4-gram
    # reformatted copy (case, punctuation, line breaks) of the problem sentence with a new ending: 14 of 17 4-grams
    restated = "natalia SOLD clips to 48 of her friends in april; and then she sold half as many. So what now?"
    assert copy_rate(restated, MATH_INSTRUCTION) == pytest.approx(14 / 17)
    [copied] = diagnose({"math": dialogue((MATH_INSTRUCTION, MATH_INSTRUCTION))}, tokenizer)
    assert copied.copy_rate == 100.0
    [genuine] = diagnose({"math": dialogue((MATH_INSTRUCTION, CORRECT))}, tokenizer)
    assert genuine.copy_rate == 0.0


def test_a_correct_boxed_answer_scores_accuracy_and_format_one(tokenizer: PreTrainedTokenizerBase) -> None:
    [record] = diagnose({"math": dialogue((MATH_INSTRUCTION, CORRECT))}, tokenizer)
    assert (record.accuracy, record.math_dialogues) == (100.0, 1)
    assert (record.format_rate, record.format_dialogues) == (100.0, 1)
    assert record.reward == len(CORRECT) and record.reward_nan == 0
    assert math.isnan(record.pass_rate) and record.coding_dialogues == 0  # no Coding row


def test_a_wrong_answer_scores_accuracy_zero_and_a_later_turn_can_correct_it(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    dialogues = {"math": dialogue((MATH_INSTRUCTION, WRONG), ("Are you sure?", CORRECT))}
    first, second = diagnose(dialogues, tokenizer, horizon=2)
    assert (first.accuracy, first.format_rate) == (0.0, 0.0)  # "The answer is 96": wrong, and not boxed
    assert (second.accuracy, second.format_rate) == (100.0, 100.0)  # the turn-2 reply is read at h = 2
    # a later reply without an explicit answer keeps the earlier one (the reward's own extraction)
    dialogues = {"math": dialogue((MATH_INSTRUCTION, CORRECT), ("Why?", "Because she sold 24 in May and 13 later."))}
    assert [record.accuracy for record in diagnose(dialogues, tokenizer, horizon=2)] == [100.0, 100.0]


def test_rows_with_per_turn_references_are_scored_at_every_turn_against_that_turns_reference(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Arithmetic rows: the turn-h reply against turn h's reference; an earlier answer is no answer at turn h."""
    request = " Present your final answer as \\boxed{Your Answer}."
    arithmetic = PromptRow(
        id="arithmetic",
        task="Math_CoT",
        dataset="arithmetic",
        instruction="What is 6 times 7?" + request,
        reference="42",
        meta={
            "follow_ups": ["Multiply that by 3." + request, "Now add 17 to that." + request],
            "turn_references": ["42", "126", "143"],
        },
    )
    turns = [arithmetic.instruction, *arithmetic.follow_ups]
    policies = {
        "right, wrong, recovered": ["\\boxed{42}", "\\boxed{125}", "The answer is 143."],
        "right, then silent": ["\\boxed{42}", "Let me think.", "I am not sure."],
        "wrong, then right on its own answer": ["\\boxed{40}", "\\boxed{120}", "\\boxed{137}"],
    }
    accuracy = {
        name: [
            record.accuracy
            for record in policy_diagnostics(
                name,
                {"arithmetic": dialogue(*zip(turns, replies, strict=True))},
                {"arithmetic": arithmetic},
                3,
                reward=LastReplyLength(),
                tokenizer=tokenizer,
            )
        ]
        for name, replies in policies.items()
    }
    assert accuracy == {
        "right, wrong, recovered": [100.0, 0.0, 100.0],
        "right, then silent": [100.0, 0.0, 0.0],
        "wrong, then right on its own answer": [0.0, 0.0, 0.0],
    }


def test_the_fallback_question_is_counted_over_the_user_turns_after_each_reply(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    dialogues = {
        "math": dialogue((MATH_INSTRUCTION, WRONG), (FALLBACK_QUESTION, CORRECT)),
        "logic": dialogue((LOGIC_INSTRUCTION, "Yes."), ("Which nationality?", "American.")),
        "code": dialogue((CODE_INSTRUCTION, PASSING_CODE)),  # ended after turn 1: no user turn follows
    }
    first, second = diagnose(dialogues, tokenizer, horizon=2)
    assert (first.fallback_rate, first.user_turns, first.dialogues) == (50.0, 2, 3)
    assert math.isnan(second.fallback_rate) and second.user_turns == 0 and second.dialogues == 2  # h = H


def test_code_tests_format_exclusions_and_nan_rewards(tokenizer: PreTrainedTokenizerBase) -> None:
    dialogues = {
        "code": dialogue((CODE_INSTRUCTION, PASSING_CODE)),
        "math": dialogue((MATH_INSTRUCTION, CORRECT)),
        "logic": dialogue((LOGIC_INSTRUCTION, "Yes, both were American.")),
    }
    [record] = diagnose(dialogues, tokenizer)
    assert (record.pass_rate, record.coding_dialogues) == (100.0, 1)
    assert (record.format_rate, record.format_dialogues) == (100.0, 2)  # Logic requests no recognised format
    assert record.reward_nan == 1 and record.reward == (len(PASSING_CODE) + len(CORRECT)) / 2
    failing = {"code": dialogue((CODE_INSTRUCTION, "```python\ndef add(a, b):\n    return a - b\n```"))}
    [record] = diagnose(failing, tokenizer)
    assert (record.pass_rate, record.format_rate) == (0.0, 100.0)
    [record] = diagnose({"code": dialogue((CODE_INSTRUCTION, "def add(a, b): return a + b"))}, tokenizer)
    assert (record.pass_rate, record.format_rate) == (0.0, 0.0)  # no fenced block: neither format nor tests


def test_reply_lengths_are_exact_policy_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    replies = {"math": CORRECT, "code": PASSING_CODE, "logic": ""}
    [record] = diagnose({pid: dialogue((ROWS[pid].instruction, reply)) for pid, reply in replies.items()}, tokenizer)
    lengths = [len(tokenizer.encode(reply, add_special_tokens=False)) for reply in replies.values()]
    assert lengths[2] == 0 and min(lengths[:2]) > 10
    assert record.reply_tokens == sum(lengths) / 3


def test_turns_nobody_reached_are_reported_empty(tokenizer: PreTrainedTokenizerBase) -> None:
    records = diagnose({"math": dialogue((MATH_INSTRUCTION, CORRECT))}, tokenizer, horizon=3)
    assert [record.turn for record in records] == [1, 2, 3]
    assert records[2].dialogues == 0 and math.isnan(records[2].reply_tokens) and math.isnan(records[2].copy_rate)
    with pytest.raises(KeyError, match="no prompt row for prompt ids \\['unknown'\\]"):
        diagnose({"unknown": dialogue((MATH_INSTRUCTION, CORRECT))}, tokenizer)


def test_requested_formats_of_the_shared_prompts(shared_prompts: Path) -> None:
    """Every Math_CoT prompt asks for a boxed answer, every Coding prompt for a python block, Logic for neither."""
    prompts = pd.read_json(shared_prompts, lines=True)
    formats = prompts["instruction"].map(lambda text: getattr(requested_format(text), "name", "none"))
    by_task = formats.groupby(prompts["task"]).agg(lambda names: set(names))
    assert by_task.to_dict() == {"Math_CoT": {"boxed"}, "Coding": {"python_block"}, "Logic": {"none"}}


def test_saved_table_and_plot(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    dialogues = {"math": dialogue((MATH_INSTRUCTION, WRONG), (FALLBACK_QUESTION, CORRECT))}
    frame = diagnostics_frame(
        record
        for method in ("base", "tuned")
        for record in policy_diagnostics(method, dialogues, ROWS, 2, reward=LastReplyLength(), tokenizer=tokenizer)
    )
    paths = save_diagnostics(frame, tmp_path / "out", title="test")
    saved = pd.read_csv(paths["diagnostics"])
    assert tuple(saved.columns) == DIAGNOSTIC_COLUMNS
    assert list(zip(saved["method"], saved["turn"], strict=True)) == [
        ("base", 1),
        ("base", 2),
        ("tuned", 1),
        ("tuned", 2),
    ]
    assert paths["diagnostics_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="missing columns \\['copy_rate'\\]"):
        save_diagnostics(frame.drop(columns="copy_rate"), tmp_path, title="test")
