"""The Logic (HotpotQA) reward: HotpotQA exact match and token F1 of the stated answer, routed by ``verifier``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from doubles import first_rows

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.answer_match import (
    AnswerMatchReward,
    exact_match,
    normalize_answer,
    stated_answer,
    token_f1,
)
from dialogsim.rewards.factory import build_reward_model

ROW = PromptRow(
    id="hand-logic",
    task="Logic",
    dataset="hotpotqa",
    instruction="What government position was held by the woman who portrayed Corliss Archer in Kiss and Tell?",
    reference="Chief of Protocol",
)
YES_ROW = PromptRow(
    id="hand-yes",
    task="Logic",
    dataset="hotpotqa",
    instruction="Were Scott Derrickson and Ed Wood of the same nationality?",
    reference="yes",
)


def _dialogue(*replies: str, question: str = ROW.instruction) -> list[Message]:
    dialogue: list[Message] = []
    for index, reply in enumerate(replies):
        dialogue.append({"role": "user", "content": question if index == 0 else "Are you sure?"})
        dialogue.append({"role": "assistant", "content": reply})
    return dialogue


def _score(*replies: str, row: PromptRow = ROW) -> float:
    reward = AnswerMatchReward()
    (value,) = reward.score([_dialogue(*replies, question=row.instruction)], [row])
    assert not reward.failures
    return value


def test_hotpotqa_metrics() -> None:
    """SQuAD / HotpotQA normalisation, exact match, token F1 and the yes / no rule, on hand-computed cases."""
    assert normalize_answer("  The Chief-of Protocol, an  office! ") == "chiefof protocol office"
    assert exact_match("the Chief of Protocol.", "Chief of Protocol") == 1.0
    assert exact_match("9984", "9,984") == 1.0
    # prediction tokens: chief of protocol of united states (6); common with the reference: 3 -> P 1/2, R 1
    assert token_f1("Chief of Protocol of the United States", "Chief of Protocol") == pytest.approx(2 / 3)
    assert token_f1("Ambassador to Ghana", "Chief of Protocol") == 0.0
    assert token_f1("yes", "Yes.") == 1.0
    assert token_f1("yes they were", "yes") == 0.0  # a closed answer scores only when equal
    assert token_f1("no", "no answer here") == 0.0


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Step 1: search.\nAnswer:\nChief of Protocol", "Chief of Protocol"),
        ("So the answer is 7 October 1978. She was born then.", "7 October 1978"),
        ("The final result is \\boxed{Animorphs}.", "Animorphs"),
        ("I would need to search Wikipedia first.", None),
    ],
)
def test_stated_answer(reply: str, expected: str | None) -> None:
    assert stated_answer(reply) == expected


def test_exact_paraphrase_partial_and_wrong_answers() -> None:
    """Exact and article/punctuation/case paraphrases score 1.5, a longer span its F1 / 2, a wrong answer 0."""
    assert _score("Chief of Protocol") == 1.5
    assert _score("Shirley Temple held it. The answer is: the CHIEF of protocol!") == 1.5
    assert _score("Answer: Chief of Protocol of the United States") == pytest.approx(0.5 * 2 / 3)
    assert _score("The answer is Ambassador to Ghana.") == 0.0
    assert _score("Yes.", row=YES_ROW) == 1.5
    assert _score("The answer is no.", row=YES_ROW) == 0.0


def test_latest_stated_answer_wins_and_rambling_costs_precision() -> None:
    """A later turn's stated answer replaces an earlier one; without any stated answer the whole last reply is
    the prediction, so a long reply that contains the answer scores a small F1, not an exact match."""
    assert _score("The answer is Ambassador to Ghana.", "Sorry, the answer is Chief of Protocol.") == 1.5
    assert _score("The answer is Chief of Protocol.", "Let me add some more detail about her career.") == 1.5
    rambling = "Shirley Temple, who played Corliss Archer, later served as the Chief of Protocol in Washington."
    assert 0 < _score(rambling) < 0.25


def test_failures_are_nan_and_counted() -> None:
    reward = AnswerMatchReward()
    math_row = PromptRow(id="m", task="Math_CoT", dataset="gsm8k", instruction="2+2?", reference="4")
    no_reference = PromptRow(id="n", task="Logic", dataset="hotpotqa", instruction="Who?", reference=None)
    scores = reward.score(
        [_dialogue("4"), _dialogue("Ed Wood"), [{"role": "user", "content": "Who?"}]], [math_row, no_reference, ROW]
    )
    assert all(math.isnan(value) for value in scores)
    assert reward.failures == {"unsupported_task:Math_CoT": 1, "no_reference": 1, "no_assistant_reply": 1}


def test_verifier_scores_real_logic_rows(shared_prompts: Path) -> None:
    """``--reward verifier`` routes the shared HotpotQA rows to the answer match: the reference stated as the
    answer scores 1.5 on every row, another row's (different) reference 0 or a small F1, never NaN."""
    rows = first_rows(shared_prompts, 20, task="Logic")
    verifier = build_reward_model("verifier")
    right = [
        _dialogue(f"Let me think step by step.\nAnswer:\n{row.reference}", question=row.instruction) for row in rows
    ]
    others = [
        next(o for o in rows if normalize_answer(o.reference or "") != normalize_answer(r.reference or ""))
        for r in rows
    ]
    wrong = [
        _dialogue(f"The answer is {other.reference}.", question=row.instruction)
        for row, other in zip(rows, others, strict=True)
    ]
    right_scores = verifier.score(right, rows)
    wrong_scores = verifier.score(wrong, rows)
    assert right_scores == [1.5] * len(rows)
    assert all(0 <= value < 0.75 for value in wrong_scores), wrong_scores
    assert not verifier.failures
