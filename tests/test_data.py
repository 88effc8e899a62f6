"""Tests of dialogsim.data: loading, validation, filters, token budget and the train/eval split."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from transformers import AutoTokenizer

from dialogsim.data import (
    HUB_PROMPTS,
    LoadReport,
    PromptFormatError,
    PromptsNotFoundError,
    _prevalidate_json,
    chat_token_counts,
    default_prompt_file,
    default_prompt_source,
    load_offline_dialogues,
    load_prompts,
    prompt_token_counts,
    split_train_eval,
)
from dialogsim.prompts import PromptRow

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrainteract"
GOOD_ROWS = [
    {
        "id": "a",
        "task": "Math_CoT",
        "dataset": "gsm8k",
        "split": "train",
        "instruction": "What is 2+2?",
        "reference": "4",
    },
    {
        "id": "b",
        "task": "Math_CoT",
        "dataset": "gsm8k",
        "split": "train",
        "instruction": "What is 3+3?",
        "reference": "6",
    },
]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def load_tmp(path: Path, **kwargs: Any) -> tuple[list, LoadReport]:
    """load_prompts for a file in a pytest tmp folder, with the datasets cache beside it (not in ~/.cache)."""
    return load_prompts(path, cache_dir=str(path.parent / "hf-cache"), **kwargs)


def dropped_total(report: LoadReport) -> int:
    return (
        report.filtered_task
        + report.filtered_dataset
        + report.filtered_split
        + report.duplicate
        + report.over_token_budget
        + report.over_limit
    )


@pytest.fixture(scope="module")
def shared_raw(shared_prompts: Path) -> list[dict[str, Any]]:
    return read_jsonl(shared_prompts)


@pytest.fixture(scope="module")
def gsm8k_rows(shared_prompts: Path):
    rows, _ = load_prompts(shared_prompts, tasks=["Math_CoT"], datasets=["gsm8k"])
    return rows


# ---- the shared file ---------------------------------------------------------------------------


def test_shared_file_filtered_to_gsm8k_matches_a_direct_count(shared_prompts: Path, shared_raw: list[dict]) -> None:
    rows, report = load_prompts(shared_prompts, tasks=["Math_CoT"], datasets=["gsm8k"])
    expected = [raw for raw in shared_raw if raw["task"] == "Math_CoT" and raw["dataset"] == "gsm8k"]
    assert len(expected) == 2000
    assert [row.id for row in rows] == [raw["id"] for raw in expected]
    assert report.rows_read == len(shared_raw) == 3888
    assert report.filtered_task == sum(raw["task"] != "Math_CoT" for raw in shared_raw)
    assert report.filtered_dataset == sum(raw["task"] == "Math_CoT" and raw["dataset"] != "gsm8k" for raw in shared_raw)
    assert report.rows_kept == len(rows) and report.rows_read == report.rows_kept + dropped_total(report)
    first, raw = rows[0], expected[0]
    assert (first.instruction, first.reference, first.split) == (raw["instruction"], raw["reference"], "train")
    assert first.meta == {**raw["meta"], "source_id": raw["source_id"]}


def test_shared_file_has_one_duplicate_instruction_and_keeps_the_first(shared_prompts: Path) -> None:
    rows, report = load_prompts(shared_prompts, datasets=["mbpp"], splits=["test"])
    assert report.filtered_dataset == 3888 - 974 and report.filtered_split == 474
    assert report.duplicate == 1  # MBPP tasks 76 and 347 share their prompt text
    source_ids = {row.meta["source_id"] for row in rows}
    assert "76" in source_ids and "347" not in source_ids
    assert len(rows) == 499


def test_prevalidation_locates_every_line_of_the_shared_file(shared_prompts: Path) -> None:
    locations = _prevalidate_json(shared_prompts)
    assert len(locations) == 3888 and locations[-1].endswith("line 3888")


def test_report_is_one_line_and_logged_at_info(shared_prompts: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dialogsim.data"):
        _, report = load_prompts(shared_prompts, datasets=["humaneval"], limit=10)
    text = str(report)
    assert "\n" not in text and "kept 10 of 3888" in text and "over limit 154" in text
    assert any(record.levelno == logging.INFO and record.getMessage() == text for record in caplog.records)


def test_shuffle_and_limit_are_seeded(shared_prompts: Path, gsm8k_rows: list) -> None:
    def ids(seed: int) -> list[str]:
        rows, _ = load_prompts(shared_prompts, datasets=["gsm8k"], shuffle=True, seed=seed, limit=20)
        return [row.id for row in rows]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)
    assert set(ids(1)) <= {row.id for row in gsm8k_rows}
    assert ids(1) != [row.id for row in gsm8k_rows[:20]]


def test_filters_that_leave_nothing_raise(shared_prompts: Path) -> None:
    with pytest.raises(ValueError, match="no prompts left"):
        load_prompts(shared_prompts, tasks=["Logic"], datasets=["gsm8k"])


def test_a_bare_string_filter_is_rejected(shared_prompts: Path) -> None:
    with pytest.raises(TypeError, match=r"\['Math_CoT'\]"):
        load_prompts(shared_prompts, tasks="Math_CoT")


# ---- dedupe and token budget --------------------------------------------------------------------


def test_dedupe_keeps_the_first_of_normalised_duplicates(tmp_path: Path) -> None:
    copy = {**GOOD_ROWS[0], "id": "c", "instruction": "  what IS   2+2? "}
    rows, report = load_tmp(write_jsonl(tmp_path / "dup.jsonl", [*GOOD_ROWS, copy]))
    assert [row.id for row in rows] == ["a", "b"]
    assert (report.rows_read, report.duplicate, report.rows_kept) == (3, 1, 2)


def test_dedupe_compares_the_whole_script_of_scripted_rows(tmp_path: Path) -> None:
    """Rows that open alike but script other follow-ups are other questions; a repeated script is a duplicate."""
    scripted = [
        {**GOOD_ROWS[0], "id": f"s{index}", "meta": {"follow_ups": follow_ups, "turn_references": references}}
        for index, (follow_ups, references) in enumerate(
            [(["Add 1."], ["4", "5"]), (["Double it."], ["4", "8"]), (["  add 1. "], ["4", "5"])]
        )
    ]
    rows, report = load_tmp(write_jsonl(tmp_path / "scripted.jsonl", [GOOD_ROWS[0], *scripted]))
    assert [row.id for row in rows] == ["a", "s0", "s1"] and report.duplicate == 1
    assert rows[1].follow_ups == ("Add 1.",) and rows[1].turn_references == ("4", "5")
    assert rows[0].follow_ups == () and rows[0].turn_references == ()


def test_token_budget_drops_long_prompts(shared_prompts: Path, smollm2_path: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    rows, _ = load_prompts(shared_prompts, datasets=["humaneval"])
    lengths = {
        row.id: len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": row.instruction}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
        for row in rows
    }
    assert prompt_token_counts([row.instruction for row in rows], tokenizer) == [lengths[row.id] for row in rows]
    budget = sorted(lengths.values())[len(lengths) // 2]
    kept, report = load_prompts(shared_prompts, datasets=["humaneval"], tokenizer=tokenizer, max_prompt_tokens=budget)
    assert [row.id for row in kept] == [row.id for row in rows if lengths[row.id] <= budget]
    assert report.over_token_budget == sum(length > budget for length in lengths.values()) > 0
    assert all(lengths[row.id] <= budget for row in kept)


# ---- malformed rows ------------------------------------------------------------------------------

BAD_LINES = {
    "bad_json": (
        b'{"id": "c", "task": "Math_CoT", "dataset": "gsm8k", "instruction": "1+1?" "reference": "2"}',
        "instruction",
    ),
    "missing_instruction": (b'{"id": "c", "task": "Math_CoT", "dataset": "gsm8k", "reference": "2"}', "instruction"),
    "empty_instruction": (b'{"id": "c", "task": "Math_CoT", "dataset": "gsm8k", "instruction": "  "}', "instruction"),
    "reference_is_a_number": (
        b'{"id": "c", "task": "Math_CoT", "dataset": "gsm8k", "instruction": "1+1?", "reference": 2}',
        "reference",
    ),
    "id_is_a_number": (b'{"id": 7, "task": "Math_CoT", "dataset": "gsm8k", "instruction": "1+1?"}', "id"),
    "task_missing": (b'{"id": "c", "dataset": "gsm8k", "instruction": "1+1?"}', "task"),
    "not_utf8": (
        b'{"id": "c", "task": "Math_CoT", "dataset": "gsm8k", "instruction": "caf\xe9 au lait?"}',
        "instruction",
    ),
    "duplicate_id": (b'{"id": "a", "task": "Math_CoT", "dataset": "gsm8k", "instruction": "1+1?"}', "id"),
    "follow_up_not_a_string": (
        b'{"id": "c", "task": "Math_CoT", "dataset": "x", "instruction": "1+1?", "meta": {"follow_ups": [3]}}',
        "meta.follow_ups",
    ),
    "empty_follow_up": (
        b'{"id": "c", "task": "Math_CoT", "dataset": "x", "instruction": "1+1?", "meta": {"follow_ups": [" "]}}',
        "meta.follow_ups",
    ),
    "a_reference_per_turn_missing": (
        b'{"id": "c", "task": "Math_CoT", "dataset": "x", "instruction": "1+1?", '
        b'"meta": {"follow_ups": ["Add 1."], "turn_references": ["2"]}}',
        "meta.turn_references",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
@pytest.mark.parametrize("second_line", ["good", "blank"])
def test_malformed_line_names_file_line_and_field(tmp_path: Path, case: str, second_line: str) -> None:
    bad, field = BAD_LINES[case]
    second = json.dumps(GOOD_ROWS[1]).encode() if second_line == "good" else b""
    path = tmp_path / f"broken_{case}.jsonl"
    path.write_bytes(b"\n".join([json.dumps(GOOD_ROWS[0]).encode(), second, bad]) + b"\n")
    with pytest.raises(PromptFormatError) as caught:
        load_tmp(path)
    message = str(caught.value)
    assert path.name in message and "line 3" in message and repr(field) in message, message


def test_non_object_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "array_line.jsonl"
    path.write_text(json.dumps(GOOD_ROWS[0]) + '\n["not", "a", "row"]\n')
    with pytest.raises(
        PromptFormatError, match=r"array_line\.jsonl, line 2: expected a JSON object .* got a JSON array"
    ):
        load_prompts(path)


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file_is_reported(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(PromptFormatError, match=r"empty\.jsonl: the file is empty"):
        load_prompts(path)


def test_missing_source_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(PromptsNotFoundError, match="openbmb/UltraInteract_sft"):
        load_prompts(tmp_path / "nope.jsonl")


@pytest.mark.skipif(os.environ.get("HF_DATASETS_OFFLINE") != "1", reason="needs offline mode (never download)")
def test_unreachable_hub_id_points_to_a_local_file() -> None:
    with pytest.raises(ConnectionError, match="pass a local prompt file"):
        load_prompts("openbmb/UltraInteract_sft")


# ---- parquet and the UltraInteract hub schemas --------------------------------------------------


def test_parquet_round_trip_matches_jsonl(tmp_path: Path, shared_raw: list[dict]) -> None:
    raw = shared_raw[1990:2010]  # gsm8k and MATH rows: different meta keys per row
    from_jsonl, _ = load_tmp(write_jsonl(tmp_path / "rows.jsonl", raw))
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame(raw).to_parquet(parquet)
    from_parquet, report = load_tmp(parquet)
    assert from_parquet == from_jsonl
    assert report.rows_kept == 20 and {row.dataset for row in from_parquet} == {"gsm8k", "MATH"}


def test_parquet_errors_name_the_row_index(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pd.DataFrame([GOOD_ROWS[0], {**GOOD_ROWS[1], "instruction": ""}]).to_parquet(path)
    with pytest.raises(PromptFormatError, match=r"bad\.parquet, row 1 \(0-based\): field 'instruction' is empty"):
        load_tmp(path)


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_pair_schema_uses_the_first_user_turn(tmp_path: Path, file_format: str) -> None:
    raw = read_jsonl(DATA_DIR / "pair_readme_example.jsonl")
    path = DATA_DIR / "pair_readme_example.jsonl"
    if file_format == "parquet":
        path = tmp_path / "pair.parquet"
        pd.DataFrame(raw).to_parquet(path)
    (row,), _ = load_prompts(path, cache_dir=str(tmp_path / "hf-cache"))
    assert raw[0]["trajectory"][0]["from"] == "user"
    assert row.instruction == raw[0]["trajectory"][0]["value"]
    # UltraInteract publishes one split, train: its rows pass the default splits=["train"] filter
    assert (row.id, row.task, row.dataset, row.reference, row.split) == (
        raw[0]["id"],
        "Math_PoT",
        "MATH",
        None,
        "train",
    )
    assert row.meta["chosen"] == raw[0]["chosen"] and row.meta["parent_id"] == raw[0]["parent_id"]
    assert row.meta["trajectory"] == raw[0]["trajectory"]


def test_sft_schema_uses_the_instruction() -> None:
    raw = read_jsonl(DATA_DIR / "sft_readme_examples.jsonl")
    rows, _ = load_prompts(DATA_DIR / "sft_readme_examples.jsonl")
    assert [row.instruction for row in rows] == [item["instruction"] for item in raw]
    assert [row.dataset for row in rows] == ["codecontest", "mathqa"]
    assert all(row.reference is None for row in rows)
    assert [row.meta["response"] for row in rows] == [item["response"] for item in raw]


def test_sft_math_row_gets_the_boxed_answer_of_its_response_as_reference(tmp_path: Path, shared_raw: list) -> None:
    """An UltraInteract_sft row has no split and no reference; the main job's filters must still keep it.

    The README's two SFT examples are real (Coding, Math_PoT: no boxed answer, so no reference); the
    Math_CoT row is built in the sft schema from a real GSM8K row, its response ending as UltraInteract's
    Math_CoT responses do (``Answer: \\boxed{...}``).
    """
    gsm8k = shared_raw[0]
    math_cot = {
        "task": "Math_CoT",
        "dataset": "gsm8k",
        "instruction": gsm8k["instruction"],
        "response": f"Step 1: {gsm8k['meta']['source_solution']}\nAnswer:\n\\boxed{{{gsm8k['reference']}}}",
        "id": "0" * 64 + "_1_1",
        "parent_id": "0" * 64,
    }
    path = write_jsonl(tmp_path / "sft.jsonl", [*read_jsonl(DATA_DIR / "sft_readme_examples.jsonl"), math_cot])
    rows, report = load_tmp(path, splits=["train"])
    assert report.rows_kept == 3 and [row.split for row in rows] == ["train"] * 3
    assert [row.reference for row in rows] == [None, None, gsm8k["reference"]]
    (row,), _ = load_tmp(path, tasks=["Math_CoT"], datasets=["gsm8k"], splits=["train"])  # the main job's filters
    assert row.reference == "72" and row.meta["response"] == math_cot["response"]


def test_all_keeps_every_value_of_a_filter(shared_prompts: Path) -> None:
    everything, report = load_prompts(shared_prompts, tasks=["all"], datasets=["all"], splits=["all"])
    unfiltered, _ = load_prompts(shared_prompts, tasks=None)
    assert everything == unfiltered and report.filtered_task == report.filtered_dataset == report.filtered_split == 0
    assert {row.task for row in everything} == {"Math_CoT", "Coding", "Logic"}


def test_json_array_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(GOOD_ROWS))
    rows, _ = load_tmp(path)
    assert [row.instruction for row in rows] == [item["instruction"] for item in GOOD_ROWS]


# ---- default file and train/eval split ----------------------------------------------------------


def test_default_prompt_file(monkeypatch: pytest.MonkeyPatch, shared_prompts: Path, tmp_path: Path) -> None:
    monkeypatch.delenv("DIALOGSIM_PROMPTS", raising=False)
    assert default_prompt_file() == shared_prompts
    custom = write_jsonl(tmp_path / "mine.jsonl", GOOD_ROWS)
    monkeypatch.setenv("DIALOGSIM_PROMPTS", str(custom))
    assert default_prompt_file() == custom
    monkeypatch.setenv("DIALOGSIM_PROMPTS", str(tmp_path / "missing.jsonl"))
    with pytest.raises(PromptsNotFoundError, match="DIALOGSIM_PROMPTS"):
        default_prompt_file()


def test_default_prompt_source_is_the_local_file_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch, shared_prompts: Path, tmp_path: Path
) -> None:
    monkeypatch.delenv("DIALOGSIM_PROMPTS", raising=False)
    assert default_prompt_source(offline=False) == shared_prompts  # local first, even online
    custom = write_jsonl(tmp_path / "mine.jsonl", GOOD_ROWS)
    monkeypatch.setenv("DIALOGSIM_PROMPTS", str(custom))
    assert default_prompt_source(shared=tmp_path / "missing.jsonl", offline=True) == custom


def test_default_prompt_source_names_the_hub_dataset_online_without_a_local_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only the name is returned: nothing is fetched (load_prompts would read it with the same filters)."""
    monkeypatch.delenv("DIALOGSIM_PROMPTS", raising=False)
    assert default_prompt_source(shared=tmp_path / "missing.jsonl", offline=False) == HUB_PROMPTS
    assert HUB_PROMPTS == "openbmb/UltraInteract_sft"


@pytest.mark.skipif(os.environ.get("HF_DATASETS_OFFLINE") != "1", reason="needs offline mode (never download)")
def test_default_prompt_source_offline_without_a_local_file_says_how_to_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DIALOGSIM_PROMPTS", raising=False)
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(PromptsNotFoundError, match=r"hub is off .*pass --prompts <file>, set \$DIALOGSIM_PROMPTS"):
        default_prompt_source(shared=missing)  # offline read from datasets.config (HF_DATASETS_OFFLINE=1 here)
    with pytest.raises(PromptsNotFoundError, match=re.escape(str(missing))):
        default_prompt_source(shared=missing, offline=True)


def test_split_train_eval_is_disjoint_and_deterministic(gsm8k_rows: list) -> None:
    train, evaluation = split_train_eval(gsm8k_rows, eval_fraction=0.1, seed=3)
    train_ids, eval_ids = {row.id for row in train}, {row.id for row in evaluation}
    assert len(evaluation) == 200 and len(train) == 1800
    assert not train_ids & eval_ids and train_ids | eval_ids == {row.id for row in gsm8k_rows}
    again_train, again_eval = split_train_eval(list(reversed(gsm8k_rows)), eval_fraction=0.1, seed=3)
    assert {row.id for row in again_eval} == eval_ids and {row.id for row in again_train} == train_ids
    assert [row.id for row in train] == [row.id for row in gsm8k_rows if row.id in train_ids]
    _, other_eval = split_train_eval(gsm8k_rows, eval_count=200, seed=4)
    assert {row.id for row in other_eval} != eval_ids


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({}, "exactly one"), ({"eval_fraction": 0.1, "eval_count": 3}, "exactly one"), ({"eval_count": 2000}, "empty")],
)
def test_split_train_eval_rejects_bad_sizes(gsm8k_rows: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_train_eval(gsm8k_rows, **kwargs)


def test_split_train_eval_rejects_duplicate_ids(gsm8k_rows: list) -> None:
    with pytest.raises(ValueError, match="unique row ids"):
        split_train_eval([*gsm8k_rows[:5], gsm8k_rows[0]], eval_count=1)


# ---- offline dialogues (dataset resets) ---------------------------------------------------------

PROMPTS = [
    PromptRow(**{key: row[key] for key in ("id", "task", "dataset", "instruction", "reference")}) for row in GOOD_ROWS
]


def _chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """Messages alternating user / assistant from the given texts (after an optional system message)."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


OFFLINE_ROWS = [
    {"id": "good", "messages": _chat("What is 2+2?", "5", "Are you sure?", "Yes.")},  # cut after "Are you sure?"
    {"id": "system", "messages": _chat("what is 3+3? ", "6", "Why?", system="Be brief.")},  # matched up to case/space
    {"id": "two_users", "messages": [*_chat("What is 2+2?"), *_chat("Hello?")]},
    {"id": "assistant_first", "messages": [{"role": "assistant", "content": "Hi"}, *_chat("What is 2+2?")]},
    {"id": "empty_list", "messages": []},
    {"id": "blank_message", "messages": _chat("What is 2+2?", "  ", "And?")},
    {"id": "system_only", "messages": [{"role": "system", "content": "Be brief."}]},
    {"id": "no_messages"},
    {"id": "content_number", "messages": [{"role": "user", "content": 4}]},
    {"id": "unknown_role", "messages": [{"role": "robot", "content": "What is 2+2?"}]},
    {"id": "not_a_list", "messages": "What is 2+2?"},
    {"id": "missing_content", "messages": [{"role": "user"}]},
    {"id": "good_again", "messages": _chat("What is 2+2?", "5", "Are you sure?", "Sure.")},  # same cut prefix
    {"id": "unknown_prompt", "messages": _chat("What is 9+9?", "18", "Why?")},
]
EXPECTED_DROPS = {"roles_not_alternating": 2, "empty": 4, "malformed": 4, "duplicate": 1, "no_prompt_row": 1}


def test_offline_dialogues_skip_and_count_bad_rows(tmp_path: Path) -> None:
    """Malformed, non-alternating, empty, duplicate and unmatched rows are counted and skipped, never raised."""
    path = write_jsonl(tmp_path / "chats.jsonl", OFFLINE_ROWS)
    dialogues, report = load_offline_dialogues(path, PROMPTS, cache_dir=str(tmp_path / "hf-cache"))
    assert [(d.id, d.prompt_id, d.turns) for d in dialogues] == [("good", "a", 2), ("system", "b", 2)]
    assert dialogues[0].messages == tuple(_chat("What is 2+2?", "5", "Are you sure?"))  # ends with a user message
    assert dialogues[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert {name: getattr(report, name) for name in EXPECTED_DROPS} == EXPECTED_DROPS
    assert (report.rows_read, report.rows_kept) == (len(OFFLINE_ROWS), 2)
    assert report.rows_read == report.rows_kept + report.dropped
    text = str(report)
    assert "\n" not in text and "kept 2 of 14 dialogues" in text and "roles not alternating 2" in text


def test_offline_prefixes_and_max_turns(tmp_path: Path) -> None:
    """prefix(k) is the dialogue up to its k-th user message; max_turns keeps at most that many user messages."""
    path = write_jsonl(tmp_path / "chats.jsonl", OFFLINE_ROWS[:1])
    (full,), _ = load_offline_dialogues(path, PROMPTS, cache_dir=str(tmp_path / "hf-cache"))
    assert full.prefix(1) == _chat("What is 2+2?") and full.prefix(2) == _chat("What is 2+2?", "5", "Are you sure?")
    with pytest.raises(ValueError, match="turn 3"):
        full.prefix(3)
    (cut,), _ = load_offline_dialogues(path, PROMPTS, max_turns=1, cache_dir=str(tmp_path / "hf-cache"))
    assert cut.messages == tuple(_chat("What is 2+2?")) and cut.turns == 1


def test_offline_dialogues_from_the_pair_trajectory(tmp_path: Path) -> None:
    """UltraInteract_pair's multi-turn trajectory ({from, value}) loads as messages, mapped to its prompt row."""
    source = DATA_DIR / "pair_readme_example.jsonl"
    (raw,) = read_jsonl(source)
    prompts, _ = load_prompts(source, cache_dir=str(tmp_path / "hf-cache"))
    (dialogue,), report = load_offline_dialogues(source, prompts, cache_dir=str(tmp_path / "hf-cache"))
    trajectory = [{"role": turn["from"], "content": turn["value"]} for turn in raw["trajectory"]]
    assert list(dialogue.messages) == trajectory and dialogue.turns == 3 and trajectory[-1]["role"] == "user"
    assert (dialogue.id, dialogue.prompt_id, report.rows_kept) == (raw["id"], prompts[0].id, 1)
    parquet = tmp_path / "pair.parquet"
    pd.DataFrame([raw]).to_parquet(parquet)
    assert load_offline_dialogues(parquet, prompts, cache_dir=str(tmp_path / "hf-cache"))[0] == [dialogue]


def test_offline_token_budget(tmp_path: Path, smollm2_path: str) -> None:
    """Dialogues whose cut prefix (chat template + generation prompt) exceeds the budget are counted and dropped."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    path = write_jsonl(tmp_path / "chats.jsonl", OFFLINE_ROWS[:2])
    dialogues, _ = load_offline_dialogues(path, PROMPTS, cache_dir=str(tmp_path / "hf-cache"))
    lengths = chat_token_counts([d.messages for d in dialogues], tokenizer)
    assert lengths[0] == len(
        tokenizer.apply_chat_template(list(dialogues[0].messages), add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
    )
    budget = min(lengths)
    kept, report = load_offline_dialogues(
        path, PROMPTS, tokenizer=tokenizer, max_dialogue_tokens=budget, cache_dir=str(tmp_path / "hf-cache")
    )
    assert [d.id for d in kept] == [d.id for d, n in zip(dialogues, lengths, strict=True) if n <= budget]
    assert report.over_token_budget == sum(n > budget for n in lengths) > 0


def test_offline_source_errors(tmp_path: Path, shared_prompts: Path) -> None:
    """A source without a dialogue column, or one whose every row is dropped, raises saying what to do."""
    with pytest.raises(PromptFormatError, match="'messages' column"):
        load_offline_dialogues(shared_prompts, PROMPTS)
    path = write_jsonl(tmp_path / "bad.jsonl", OFFLINE_ROWS[2:5])
    with pytest.raises(ValueError, match=r"no offline dialogues left.*kept 0 of 3"):
        load_offline_dialogues(path, PROMPTS, cache_dir=str(tmp_path / "hf-cache"))
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        load_offline_dialogues(path, PROMPTS, max_turns=0)
