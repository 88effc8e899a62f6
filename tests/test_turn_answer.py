"""The per-turn exact reward: its docstring's worked table, the turn it reads, NaN reasons, the factory."""

from __future__ import annotations

import math
import re

import pytest

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.factory import build_reward_model, check_reward_scores
from dialogsim.rewards.turn_answer import TurnAnswerReward

FORMAT = " Present your final answer as \\boxed{Your Answer}."
ROW = PromptRow(
    id="arithmetic-doc",
    task="Math_CoT",
    dataset="arithmetic",
    instruction="What is 6 times 7?" + FORMAT,
    reference="42",
    meta={
        "follow_ups": ["Multiply that by 3." + FORMAT, "Now add 17 to that." + FORMAT],
        "turn_references": ["42", "126", "143"],
    },
)
# One row of the docstring table: ``reply``  (note)   correct  boxed  r
_TABLE_ROW = re.compile(r"^\s*``(?P<reply>.+?)``.*?\s(?P<correct>[01])\s+(?P<boxed>[01])\s+(?P<reward>\d\.\d\d)\s*$")


def docstring_table() -> list[tuple[str, float, float, float]]:
    """(reply, correct, boxed, r) of every row of TurnAnswerReward's worked table."""
    doc = TurnAnswerReward.__doc__ or ""
    table = doc.split("    ==========")[2]  # the rows: after the second rule line, before the third
    rows = [match for line in table.splitlines() if (match := _TABLE_ROW.match(line))]
    return [(m["reply"], float(m["correct"]), float(m["boxed"]), float(m["reward"])) for m in rows]


def dialogue(*replies: str) -> list[Message]:
    """The dialogue of ROW with these assistant replies (turn h's user message before reply h)."""
    users = [ROW.instruction, *ROW.follow_ups]
    return [
        message
        for user, reply in zip(users, replies, strict=False)
        for message in ({"role": "user", "content": user}, {"role": "assistant", "content": reply})
    ]


def test_the_docstring_table_is_reproduced_on_its_fixed_replies() -> None:
    table = docstring_table()
    assert len(table) == 10, table
    reward = TurnAnswerReward()
    turn_two = "42 × 3 = 126, so \\boxed{126}."
    for reply, correct, boxed, expected in table:
        assert TurnAnswerReward.parts(reply, "143") == {"correct": correct, "boxed": boxed}, reply
        (score,) = reward.score([dialogue("\\boxed{42}", turn_two, reply)], [ROW])
        assert score == pytest.approx(expected), reply
    assert not reward.failures


def test_each_turn_is_scored_against_its_own_reference() -> None:
    """The same reply earns at the turn whose reference it states, and nothing at another turn."""
    reward = TurnAnswerReward()
    right_each_turn = ["\\boxed{42}", "\\boxed{126}", "\\boxed{143}"]
    scores = reward.score([dialogue(*right_each_turn[:h]) for h in (1, 2, 3)], [ROW] * 3)
    assert scores == [1.25, 1.25, 1.25]
    stuck_at_42 = reward.score([dialogue(*["\\boxed{42}"] * h) for h in (1, 2, 3)], [ROW] * 3)
    assert stuck_at_42 == [1.25, 0.25, 0.25]


def test_unscorable_dialogues_are_nan_with_a_counted_reason() -> None:
    reward = TurnAnswerReward()
    gsm8k = PromptRow(id="g", task="Math_CoT", dataset="gsm8k", instruction="2+2?", reference="4")
    past_the_script = [
        *dialogue("\\boxed{42}", "\\boxed{126}", "\\boxed{143}"),
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "\\boxed{1}"},
    ]
    scores = reward.score(
        [[{"role": "user", "content": ROW.instruction}], dialogue("\\boxed{4}"), past_the_script], [ROW, gsm8k, ROW]
    )
    assert all(math.isnan(score) for score in scores)
    assert reward.failures == {"no_assistant_reply": 1, "no_turn_reference": 2}


def test_the_factory_builds_it_for_math_rows() -> None:
    assert isinstance(build_reward_model("turn_answer"), TurnAnswerReward)
    check_reward_scores("turn_answer", ["Math_CoT"])
    with pytest.raises(ValueError, match="--reward turn_answer scores only Math"):
        check_reward_scores("turn_answer", ["Coding"])
