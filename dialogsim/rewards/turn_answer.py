"""A per-turn exact reward for scripted dialogues: the last turn's answer against that turn's reference.

For rows that carry a reference per turn (``meta["turn_references"]``, e.g. the arithmetic dialogues of
:mod:`dialogsim.arithmetic`, whose follow-ups operate on the previous result). The answer is read from the
dialogue's last assistant reply only: at turn h the user asked a new question, so an answer stated at an earlier
turn answers another question. Extraction and equivalence are the math rewards' own
(:func:`~dialogsim.rewards.math_reward.dialogue_final_answer`, :func:`~dialogsim.rewards.math_verifier.answers_match`:
normalised strings, then Math-Verify).
"""

from __future__ import annotations

import math
from collections import Counter

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch
from dialogsim.rewards.math_reward import assistant_messages, dialogue_final_answer
from dialogsim.rewards.math_verifier import answers_match, last_boxed


def turn_answer_correct(reply: str, reference: str) -> bool:
    """Whether ``reply`` states ``reference`` as its answer: its last ``\\boxed{}`` / "answer is" / "####"
    statement, else its last number (:func:`~dialogsim.rewards.math_reward.dialogue_final_answer` of this one
    reply), is equivalent to ``reference`` (:func:`~dialogsim.rewards.math_verifier.answers_match`)."""
    answer = dialogue_final_answer([reply])
    return answer is not None and answers_match(answer, reference)


def answer_boxed(reply: str) -> bool:
    """Whether ``reply`` states its answer in a ``\\boxed{}`` (or ``\\fbox{}``) holding a digit, as the prompt asks.

    The last non-empty box is the answer the extraction reads first; it must hold a digit, so the prompt's own
    ``\\boxed{Your Answer}`` copied back earns nothing.
    """
    boxed = last_boxed(reply)
    return boxed is not None and any(char.isdigit() for char in boxed)


class TurnAnswerReward:
    """Correctness of the last turn's answer against that turn's reference, plus the requested format
    (implements ``RewardModel``).

    Definition, for a dialogue τ of h assistant turns started by row x (y_h = its last reply, the turn-h reply)::

        r(τ) = correctness_weight · 1[answer(y_h) ≡ x.turn_references[h − 1]]
             + format_weight      · 1[y_h states its answer in a \\boxed{} holding a digit]

    * ``answer(y)``: the reply's last ``\\boxed{}`` / "answer is" / "####" statement, else its last number;
      ``≡``: normalised strings, then Math-Verify (:func:`turn_answer_correct`).
    * Format: :func:`answer_boxed`. It pays whether or not the answer is right (the user asked for it at every
      turn); a right answer outweighs it four to one.

    Scale: unitless, in ``[0, correctness_weight + format_weight]``; with the defaults ``[0, 1.25]``. Worked on
    fixed turn-3 replies of the dialogue "What is 6 times 7?" → "Multiply that by 3." → "Now add 17 to that."
    (references 42, 126, 143; ``tests/test_turn_answer.py`` reproduces the table):

    ==========================================================  =======  =====  ======
    turn-3 reply                                                correct  boxed  r
    ==========================================================  =======  =====  ======
    ``126 + 17 = 143. So the answer is \\boxed{143}.``           1        1      1.25
    ``\\boxed{143}``                                             1        1      1.25
    ``\\boxed{143.0}``                                           1        1      1.25
    ``The answer is 143.``                                      1        0      1.00
    ``126 + 17 = 143``  (last number)                           1        0      1.00
    ``\\boxed{142}``                                             0        1      0.25
    ``\\boxed{126}``  (turn 2's answer restated)                 0        1      0.25
    ``126 + 17 = 143 and the answer is 140.``  (stated answer)  0        0      0.00
    ``\\boxed{Your Answer}``  (the prompt's placeholder)         0        0      0.00
    ``I am not sure.``  (no answer; turn 2 said 126)            0        0      0.00
    ==========================================================  =======  =====  ======

    A dialogue whose turn-2 reply was wrong gets 0 at turn 3 unless turn 3 recovers the exact result: the
    follow-up says "that", and the reference is the exact chain's. Measured accuracy of SmolLM2-135M-Instruct on
    the turn-1 questions: 43 % (products) and 12 % (sums); see :mod:`dialogsim.arithmetic`.

    NaN, with the reason counted in :attr:`failures`: ``"no_assistant_reply"``, ``"no_turn_reference"`` (the row
    has no ``meta["turn_references"]`` entry for the dialogue's last turn, e.g. a GSM8K row: use ``math_format``).

    Args:
        correctness_weight: weight of the answer indicator.
        format_weight: weight of the boxed-answer indicator.
    """

    def __init__(self, correctness_weight: float = 1.0, format_weight: float = 0.25) -> None:
        self.correctness_weight = correctness_weight
        self.format_weight = format_weight
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per dialogue (see the class docstring).

        Raises:
            ValueError: ``dialogues`` and ``rows`` differ in length.
        """
        check_batch(dialogues, rows, "TurnAnswerReward")
        rewards = [math.nan] * len(dialogues)
        for index, (dialogue, row) in enumerate(zip(dialogues, rows, strict=True)):
            replies = assistant_messages(dialogue)
            if not replies:
                self.failures["no_assistant_reply"] += 1
            elif len(replies) > len(row.turn_references):
                self.failures["no_turn_reference"] += 1
            else:
                parts = self.parts(replies[-1], row.turn_references[len(replies) - 1])
                rewards[index] = self.correctness_weight * parts["correct"] + self.format_weight * parts["boxed"]
        return rewards

    @staticmethod
    def parts(reply: str, reference: str) -> dict[str, float]:
        """``correct`` and ``boxed`` in {0, 1} of the last reply against its turn's reference."""
        return {"correct": float(turn_answer_correct(reply, reference)), "boxed": float(answer_boxed(reply))}
