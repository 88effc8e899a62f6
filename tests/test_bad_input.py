"""Bad input on purpose (property-based, ``hypothesis``): every failure is a specific, named error.

Malformed messages, prompt files with wrong types / missing fields / non-UTF-8 bytes, and corrupted
snapshots must raise the module's own error class (never a KeyError/TypeError from deep inside) or
load cleanly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dialogsim.data import PromptFormatError, load_prompts
from dialogsim.dialogue import DialogueState, SnapshotError
from dialogsim.messages import MessageFormatError, validate_messages

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "User", ""]) | JSON, "content": JSON}
)
# derandomize: CI runs the same examples every time; regressions found by random runs become @example.
FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FILE_FUZZ = settings(FUZZ, max_examples=30)  # each example loads a file through `datasets` (~0.3 s)


@FUZZ
@given(st.lists(MESSAGE | JSON, max_size=5) | JSON)
def test_validate_messages_accepts_dialogues_or_names_the_problem(messages: Any) -> None:
    """Any value is either a valid dialogue or a MessageFormatError that names the message index or type."""
    try:
        checked = validate_messages(messages, where="fuzz")
    except MessageFormatError as error:
        assert str(error).startswith("fuzz: ")
        return
    assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in checked)


VALID_ROW = {
    "id": "row-1",
    "task": "Math_CoT",
    "dataset": "gsm8k",
    "split": "train",
    "instruction": "What is 2 + 2?",
    "reference": "4",
}


@FILE_FUZZ
@given(field=st.sampled_from(sorted(VALID_ROW)), value=JSON | st.just("__missing__"))
def test_a_bad_field_in_a_prompt_row_is_a_prompt_format_error_naming_it(
    tmp_path_factory: pytest.TempPathFactory, field: str, value: Any
) -> None:
    """Replacing or removing one field of a valid row loads, or raises PromptFormatError naming line 2."""
    row = {key: v for key, v in VALID_ROW.items() if not (key == field and value == "__missing__")}
    if value != "__missing__":
        row[field] = value
    path = tmp_path_factory.mktemp("rows") / "prompts.jsonl"
    path.write_text(json.dumps(VALID_ROW | {"id": "row-0"}) + "\n" + json.dumps(row) + "\n")
    try:
        rows, report = load_prompts(path, tasks=None)
    except PromptFormatError as error:
        assert f"{path}, line 2" in str(error), str(error)
        return
    assert report.rows_read == 2 and len(rows) == report.rows_kept <= 2


@FILE_FUZZ
@given(garbage=st.binary(min_size=1, max_size=40))
@example(garbage=b"\x0b")  # vertical tab and form feed: blank to bytes.strip(), invalid to JSON readers
@example(garbage=b"\x0c")
def test_non_utf8_or_non_json_bytes_are_a_prompt_format_error(
    tmp_path_factory: pytest.TempPathFactory, garbage: bytes
) -> None:
    """Arbitrary bytes on line 2 of a prompt file: PromptFormatError with the file and line, or a clean load.

    A clean load happens only when line 2 is blank (JSON whitespace), and then it holds line 1's row alone."""
    line = garbage.replace(b"\n", b" ")
    path = tmp_path_factory.mktemp("bytes") / "prompts.jsonl"
    path.write_bytes(json.dumps(VALID_ROW).encode() + b"\n" + line + b"\n")
    try:
        rows, report = load_prompts(path, tasks=None)
    except PromptFormatError as error:
        assert str(path) in str(error)
        return
    assert line.strip(b" \t\r") == b"", f"line 2 {line!r} is not blank, yet it loaded"
    assert report.rows_read == 1 and [row.id for row in rows] == [VALID_ROW["id"]]


def _snapshot() -> dict[str, Any]:
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    messages.append({"role": "user", "content": "Why?"})
    state = DialogueState("row-1", messages, 3, np.random.Generator(np.random.PCG64(0)))
    return json.loads(json.dumps(state.to_snapshot("fingerprint")))


@FUZZ
@given(field=st.sampled_from(sorted(_snapshot())), value=JSON)
def test_a_corrupted_snapshot_field_is_a_snapshot_error(field: str, value: Any) -> None:
    """Any one field of a snapshot replaced by any JSON value: restored consistently, or SnapshotError."""
    snapshot = _snapshot() | {field: value}
    try:
        state = DialogueState.from_snapshot(snapshot, "fingerprint", max_horizon=5)
    except SnapshotError:
        return
    assert state.turn <= state.horizon and state.messages[-1]["role"] == "user"


def test_a_snapshot_from_a_file_cut_short_is_a_snapshot_error(tmp_path: Path) -> None:
    """A snapshot file truncated mid-write cannot be parsed; one missing a field names it."""
    snapshot = _snapshot()
    del snapshot["rng_state"]
    with pytest.raises(SnapshotError, match="rng_state"):
        DialogueState.from_snapshot(snapshot, "fingerprint", max_horizon=5)
