"""A CPU reward for short-answer rows (``Logic``: HotpotQA): the dialogue's answer against the row's reference.

The two parts are the standard HotpotQA answer metrics (``hotpot_evaluate_v1.py`` of hotpotqa/hotpot,
Yang et al. 2018, which takes them from the SQuAD v1.1 evaluation script): exact match and token F1 of
normalised strings (lower-cased, punctuation and the articles a / an / the removed, whitespace collapsed),
with HotpotQA's rule that a ``yes`` / ``no`` / ``noanswer`` on either side scores F1 only when both are equal.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch
from dialogsim.rewards.math_reward import assistant_messages
from dialogsim.rewards.math_verifier import answer_phrase, last_boxed

LOGIC_TASK = "Logic"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_CLOSED_ANSWERS = frozenset({"yes", "no", "noanswer"})
# A sentence ends at . ! ? before a space and a capital (or quote, parenthesis), unless the mark follows a
# one-letter word: initials and names with abbreviations ("Philip K. Dick", "Roth v. United States",
# "Symphony No. 7", "EOG Resources, Inc.") stay whole.
_SENTENCE_END = re.compile(r"(?<!\b[A-Za-z])[.!?]+(?=\s+[A-Z\"'(])")


def normalize_answer(text: str) -> str:
    """HotpotQA / SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces.

    >>> normalize_answer("The  Chief of Protocol.")
    'chief of protocol'
    """
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal (:func:`normalize_answer`), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """HotpotQA's token F1 of the normalised answers, in [0, 1].

    Tokens are the whitespace-separated words of :func:`normalize_answer`, counted with repetition;
    F1 = 2·P·R / (P + R) with P = common / |prediction tokens|, R = common / |reference tokens|. When either
    side normalises to ``yes``, ``no`` or ``noanswer``, F1 is 0 unless both sides are equal (as in
    ``hotpot_evaluate_v1.f1_score``).

    >>> round(token_f1("Chief of Protocol of the United States", "Chief of Protocol"), 3)
    0.667
    """
    predicted, gold = normalize_answer(prediction), normalize_answer(reference)
    if (predicted in _CLOSED_ANSWERS or gold in _CLOSED_ANSWERS) and predicted != gold:
        return 0.0
    common = sum((Counter(predicted.split()) & Counter(gold.split())).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted.split()), common / len(gold.split())
    return 2 * precision * recall / (precision + recall)


def stated_answer(reply: str) -> str | None:
    """The answer one reply states explicitly: the last non-empty ``\\boxed{...}``, else the first sentence
    after the last "answer is" / "Answer:" phrase (see ``_SENTENCE_END``); ``None`` when it states none."""
    boxed = last_boxed(reply)
    if boxed:
        return boxed
    phrase = answer_phrase(reply)
    return (_SENTENCE_END.split(phrase, maxsplit=1)[0].strip().rstrip(".,;:") or None) if phrase else None


def dialogue_answer(replies: list[str]) -> str:
    """The dialogue's answer: that of the most recent reply stating one (:func:`stated_answer`), else the whole
    most recent reply (so a bare ``"Chief of Protocol."`` is an exact match and rambling costs precision).

    Args:
        replies: the assistant messages of a dialogue, oldest first; at least one.
    """
    return next((answer for reply in reversed(replies) if (answer := stated_answer(reply))), replies[-1])


class AnswerMatchReward:
    """Exact match + token F1 of the dialogue's answer against ``row.reference`` (implements ``RewardModel``).

    Definition, for a dialogue τ started by row x::

        r(τ) = exact_weight · EM(answer(τ), x.reference) + f1_weight · F1(answer(τ), x.reference)

    * ``answer(τ)``: :func:`dialogue_answer` (the most recent ``\\boxed{}`` / "answer is" / "Answer:"
      statement, else the most recent reply as a whole).
    * EM and F1: :func:`exact_match` and :func:`token_f1`, HotpotQA's answer metrics.

    Scale: unitless, in ``[0, exact_weight + f1_weight]``; with the defaults ``[0, 1.5]``, the range of the
    math reward's correct answers, so a correct answer scores 1.5 and a partly right span its F1 / 2.
    Measured on the 500 shared HotpotQA rows (one reply each): ``"Answer:\\n<reference>"`` 1.500 (500
    exact); ``"So the answer is <reference>. It was in the article."`` 1.493 (497 exact: "George I.", "World
    War I." and "STS-51-L." read as initials); the next row's reference 0.000; the question restated 0.028.

    NaN, with the reason counted in :attr:`failures`: ``"unsupported_task:<task>"`` (task not
    ``"Logic"``), ``"no_reference"``, ``"no_assistant_reply"``. :attr:`outcomes` counts scored dialogues as
    ``"exact"``, ``"partial"`` (0 < F1, not exact) and ``"wrong"``.

    Args:
        exact_weight: weight of the exact-match indicator.
        f1_weight: weight of the token F1.
    """

    def __init__(self, exact_weight: float = 1.0, f1_weight: float = 0.5) -> None:
        self.exact_weight = exact_weight
        self.f1_weight = f1_weight
        self.failures: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per dialogue (see the class docstring).

        Raises:
            ValueError: ``dialogues`` and ``rows`` differ in length.
        """
        check_batch(dialogues, rows, "AnswerMatchReward")
        rewards = [math.nan] * len(dialogues)
        for index, (dialogue, row) in enumerate(zip(dialogues, rows, strict=True)):
            replies = assistant_messages(dialogue)
            reason = _failure_reason(replies, row)
            if reason is not None:
                self.failures[reason] += 1
                continue
            parts = self.parts(replies, row.reference or "")
            rewards[index] = self.exact_weight * parts["exact"] + self.f1_weight * parts["f1"]
            self.outcomes["exact" if parts["exact"] else "partial" if parts["f1"] > 0 else "wrong"] += 1
        return rewards

    @staticmethod
    def parts(replies: list[str], reference: str) -> dict[str, float]:
        """``exact`` in {0, 1} and ``f1`` in [0, 1] of the answer of ``replies`` (at least one) vs ``reference``."""
        answer = dialogue_answer(replies)
        return {"exact": exact_match(answer, reference), "f1": token_f1(answer, reference)}


def _failure_reason(replies: list[str], row: PromptRow) -> str | None:
    if row.task != LOGIC_TASK:
        return f"unsupported_task:{row.task}"
    if not row.reference:
        return "no_reference"
    if not replies:
        return "no_assistant_reply"
    return None
