"""The arithmetic dialogues generator: exact references, determinism, disjoint splits, the prompt schema, the CLI."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from dialogsim.arithmetic import (
    FORMAT_REQUEST,
    HELDOUT_SPLIT,
    OPERATIONS,
    TRAIN_SPLIT,
    ArithmeticConfig,
    generate,
    main,
)
from dialogsim.data import load_prompts
from dialogsim.prompts import PromptRow, question_key

SMALL = ArithmeticConfig(train_dialogues=300, heldout_dialogues=60, seed=3)
_NUMBER = r"(-?\d+)"
# The operation of each user turn, read back from its text (the inverse of OPERATIONS' templates).
_QUESTION = {
    name: re.compile(re.escape(op.question).replace(r"\{a\}", _NUMBER).replace(r"\{b\}", _NUMBER) + "$")
    for name, op in OPERATIONS.items()
}
_FOLLOW_UP = {
    name: re.compile(re.escape(op.follow_up).replace(r"\{k\}", _NUMBER) + "$") for name, op in OPERATIONS.items()
}


def replay_arithmetic(row: PromptRow) -> list[int]:
    """The exact result after each turn, recomputed from the user turns' text alone."""
    turns = [turn.removesuffix(" " + FORMAT_REQUEST) for turn in (row.instruction, *row.follow_ups)]
    results = []
    for index, turn in enumerate(turns):
        patterns = _QUESTION if index == 0 else _FOLLOW_UP
        matched = [(name, match) for name, pattern in patterns.items() if (match := pattern.match(turn))]
        assert len(matched) == 1, f"turn {index + 1} of {row.id} is not one known operation: {turn!r}"
        name, match = matched[0]
        operands = [int(value) for value in match.groups()]
        results.append(OPERATIONS[name].apply(*(operands if index == 0 else [results[-1], *operands])))
    return results


@pytest.fixture(scope="module")
def small_rows() -> list[PromptRow]:
    return generate(SMALL)


def test_every_turn_asks_for_the_box_and_its_reference_is_the_exact_chain(small_rows: list[PromptRow]) -> None:
    for row in small_rows:
        assert all(turn.endswith(FORMAT_REQUEST) for turn in (row.instruction, *row.follow_ups))
        assert len(row.follow_ups) == SMALL.follow_ups
        assert [int(value) for value in row.turn_references] == replay_arithmetic(row)
        assert row.reference == row.turn_references[0]


def test_the_default_settings_open_half_the_dialogues_of_each_set_with_each_reachable_question() -> None:
    """Turn 1: products of 2..9 and sums of 10..99 (the measured 43 % / 12 %), exactly half each in both sets,
    although products, with 64 turn-1 questions, repeat a script far more often than sums."""
    rows = generate(ArithmeticConfig())
    for split, size in ((TRAIN_SPLIT, 5000), (HELDOUT_SPLIT, 500)):
        first = [row.instruction.removesuffix(" " + FORMAT_REQUEST) for row in rows if row.split == split]
        products = [list(map(int, m.groups())) for t in first if (m := _QUESTION["multiply"].match(t))]
        sums = [list(map(int, m.groups())) for t in first if (m := _QUESTION["add"].match(t))]
        assert len(products) == len(sums) == size // 2
        assert all(2 <= v <= 9 for pair in products for v in pair)
        assert all(10 <= v <= 99 for pair in sums for v in pair)


def test_same_seed_same_rows_other_seed_other_rows(small_rows: list[PromptRow]) -> None:
    assert generate(SMALL) == small_rows
    other = generate(replace(SMALL, seed=4))
    assert [row.id for row in other] != [row.id for row in small_rows]


def test_held_out_and_training_rows_share_no_question(small_rows: list[PromptRow]) -> None:
    train = [row for row in small_rows if row.split == TRAIN_SPLIT]
    heldout = [row for row in small_rows if row.split == HELDOUT_SPLIT]
    assert (len(train), len(heldout)) == (SMALL.train_dialogues, SMALL.heldout_dialogues)
    train_questions = {question_key(row) for row in train}
    heldout_questions = {question_key(row) for row in heldout}
    assert len(train_questions) == len(train) and len(heldout_questions) == len(heldout)
    assert not train_questions & heldout_questions
    assert len({row.id for row in small_rows}) == len(small_rows)


def test_settings_with_too_few_questions_are_refused() -> None:
    narrow = ArithmeticConfig(
        train_dialogues=50, heldout_dialogues=10, first_operations=["multiply"], multiply_operands=[2, 3], follow_ups=1
    )
    assert narrow.question_count("multiply") == 4 * 21
    with pytest.raises(ValueError, match=r"60 dialogues opening with multiply .* only 84 distinct questions"):
        generate(narrow)
    with pytest.raises(ValueError, match="first_operations"):
        ArithmeticConfig(first_operations=["divide"])
    with pytest.raises(ValueError, match="add_operands"):
        ArithmeticConfig(add_operands=[9, 2])


def test_the_cli_refuses_unsatisfiable_settings_with_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console convention: one ``error:`` line naming the fix, exit status 2, no traceback, no file."""
    output = tmp_path / "prompts.jsonl"
    argv = [
        "--output",
        str(output),
        "--first_operations",
        "multiply",
        "--multiply_operands",
        "2",
        "3",
        "--follow_ups",
        "0",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--train_dialogues", "100", "--heldout_dialogues", "20"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 120 dialogues opening with multiply") and "widen the operand ranges" in err
    assert "Traceback" not in err and not output.exists()


def test_the_cli_writes_the_same_file_twice_and_every_row_loads_unchanged(tmp_path: Path) -> None:
    """python -m dialogsim.arithmetic: deterministic bytes; load_prompts keeps every row (no duplicate dropped)."""
    argv = ["--train_dialogues", "300", "--heldout_dialogues", "60", "--seed", "3"]
    first, second = tmp_path / "a" / "prompts.jsonl", tmp_path / "b" / "prompts.jsonl"
    main([*argv, "--output", str(first)])
    main([*argv, "--output", str(second)])
    assert first.read_bytes() == second.read_bytes()
    cache = str(tmp_path / "hf-cache")
    train, report = load_prompts(first, tasks=["Math_CoT"], datasets=["arithmetic"], splits=["train"], cache_dir=cache)
    heldout, _ = load_prompts(first, tasks=["Math_CoT"], datasets=["arithmetic"], splits=["test"], cache_dir=cache)
    assert (len(train), len(heldout), report.duplicate) == (300, 60, 0)
    assert train + heldout == generate(SMALL)
