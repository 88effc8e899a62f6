"""A CPU math reward from what the prompt asks for: a correct answer, in ``\\boxed{}``, reached by working.

No model is loaded: every part is read off the text, so the reward is deterministic, fast, and each
part can be checked independently (accuracy, format rate, the reference's intermediate results found
in the reply, copy rate of the prompt).
"""

from __future__ import annotations

import math
import re
from collections import Counter

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch
from dialogsim.rewards.math_reward import assistant_messages, dialogue_correct, failure_reason, reference_solution
from dialogsim.rewards.math_verifier import extract_final_answer, last_boxed, normalize_answer

# Unsigned integers and decimals, thousands separators allowed; no fractions or signs, so that "48/2" and
# "48-24" give the quantities 48, 2 and 48, 24 as a reader would see them.
_QUANTITY = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
_WORD = re.compile(r"\w+")
COPY_NGRAM = 4  # words per n-gram of the copy rate
WORKING_BETA = 0.5  # F_β of the working part: precision counts 4× as much as recall


class MathFormatReward:
    """Correctness + requested format + the reference's working − copying the prompt (implements ``RewardModel``).

    Definition, for a dialogue τ started by row x (replies = its assistant messages)::

        r(τ) = correctness_weight · 1[answer(τ) ≡ x.reference]
             + format_weight      · 1[answer(τ) comes from a \\boxed{...}] · 1[correct or working > 0]
             + working_weight     · F_0.5(Q(replies) − Q(x.instruction), Q(solution) − Q(x.instruction))
             − copy_weight        · copy(replies, x.instruction)

    * ``answer(τ)`` and ``≡``: as in :class:`~dialogsim.rewards.math_reward.MathAnswerReward` (the most
      recent explicitly stated answer, else the last number; normalised strings, then Math-Verify),
      except that a last number which is one of the problem's own numbers is no answer (a restated
      problem whose last number happens to be the reference is not correct).
    * Format: the most recent assistant message that states an answer explicitly states it in a
      non-empty ``\\boxed{}`` / ``\\fbox{}``, as the prompt asks ("Present your final answer as
      \\boxed{Your Answer}"); it counts only beside a correct answer or some of the reference's working,
      so a bare boxed guess (or the prompt's own ``\\boxed{Your Answer}`` copied) earns nothing.
    * Working: ``Q(text)`` is the set of quantities (unsigned integers and decimals, normalised:
      ``"1,000"`` = ``"1000"``, ``"0.20"`` = ``"0.2"``) in the text; the solution is
      ``x.meta["source_solution"]`` (see :func:`~dialogsim.rewards.math_reward.reference_solution`).
      Removing the problem's own numbers leaves the reference's intermediate and final results, so
      restating the problem earns nothing; the precision-weighted F-score (β = 0.5, :func:`f_score`) of
      the two sets also charges numbers the reference never computes, so listing many numbers earns
      little. 0 when the reference computes no new quantity.
    * Copy: the fraction of the replies' word 4-grams (lower-cased ``\\w+`` words) that occur in the
      instruction, in [0, 1] (:func:`copy_rate`).

    Scale: unitless, in ``[-copy_weight, correctness_weight + format_weight + working_weight]``; with
    the defaults ``[-0.5, 2.0]``. Measured on 64 held-out GSM8K prompts, turn-1 replies
    (``python -m bench.reward_headroom``; SmolLM2-135M-Instruct, temperature 0.8, 128 new tokens,
    2 samples per prompt), mean per category (``math`` = :class:`MathAnswerReward`):

    ====================================  ===  ===============  ======================
    reply (turn 1)                         n   math mean (std)  math_format mean (std)
    ====================================  ===  ===============  ======================
    genuine (the policy's replies)        128  0.346 (0.174)    0.123 (0.234)
    genuine, scored on the previous row   128  0.154 (0.134)    0.124 (0.223)
    restated problem                       64  0.393 (0.034)    -0.500 (0.000)
    copied prompt (format line included)   64  0.369 (0.034)    -0.500 (0.000)
    empty                                  64  0.035 (0.023)    0.000 (0.000)
    another row's reference solution       64  0.148 (0.051)    0.074 (0.100)
    the row's reference solution           64  1.500 (0.000)    1.728 (0.033)
    bare ``\\boxed{reference}``              64  1.090 (0.044)    1.704 (0.118)
    bare ``\\boxed{reference + 1}``          64  0.072 (0.040)    0.010 (0.078)
    "The answer is <reference>."           64  1.156 (0.041)    1.454 (0.118)
    the integers 1..40                     64  0.124 (0.123)    0.072 (0.142)
    ====================================  ===  ===============  ======================

    Every reply that should not score lies below the genuine replies (``math`` ranks restating above
    them), and correct answers lie far above, boxed above unboxed. On genuine replies the parts are:
    correct 1.6 %, boxed 4.7 %, working 0.167 (non-zero in 46 %), copy 0.045; std of r 0.234, std of
    r − r' between two samples of a prompt 0.318, r ≠ r' in 91 % of pairs (``math``: 0.174, 0.266,
    100 %). Caveat: SmolLM2-135M's replies earn the same when scored against another problem (0.124),
    so their number overlap with the reference is at chance level: at this scale the room is in the
    format, the copy rate and correctness; the working part pays off once a model's arithmetic is
    about its problem.

    NaN, with the reason counted in :attr:`failures`: ``"unsupported_task:<task>"`` (task not
    starting with ``"Math"``), ``"no_reference"``, ``"no_assistant_reply"``.

    Args:
        correctness_weight: weight of the answer indicator.
        format_weight: weight of the boxed-answer indicator.
        working_weight: weight of the F1 of intermediate quantities.
        copy_weight: weight of the copy rate (subtracted).
    """

    def __init__(
        self,
        correctness_weight: float = 1.0,
        format_weight: float = 0.25,
        working_weight: float = 0.75,
        copy_weight: float = 0.5,
    ) -> None:
        self.correctness_weight = correctness_weight
        self.format_weight = format_weight
        self.working_weight = working_weight
        self.copy_weight = copy_weight
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per dialogue (see the class docstring).

        Raises:
            ValueError: ``dialogues`` and ``rows`` differ in length.
        """
        check_batch(dialogues, rows, "MathFormatReward")
        rewards = [math.nan] * len(dialogues)
        for index, (dialogue, row) in enumerate(zip(dialogues, rows, strict=True)):
            reason = failure_reason(dialogue, row)
            if reason is None:
                rewards[index] = sum(weight * value for weight, value in self._weighted_parts(dialogue, row))
            else:
                self.failures[reason] += 1
        return rewards

    def parts(self, dialogue: list[Message], row: PromptRow) -> dict[str, float]:
        """The unweighted parts of the reward of a scorable dialogue: ``correct``, ``boxed`` and
        ``working`` in {0, 1}, {0, 1}, [0, 1], and ``copy`` in [0, 1] (subtracted)."""
        replies = assistant_messages(dialogue)
        solution_quantities = quantities(reference_solution(row)) - quantities(row.instruction)
        reply_quantities = quantities("\n".join(replies)) - quantities(row.instruction)
        return {
            "correct": float(bool(dialogue_correct(dialogue, row)) and not _echoes_problem(replies, row.instruction)),
            "boxed": float(answer_is_boxed(replies)),
            "working": f_score(reply_quantities, solution_quantities),
            "copy": copy_rate("\n".join(replies), row.instruction),
        }

    def _weighted_parts(self, dialogue: list[Message], row: PromptRow) -> list[tuple[float, float]]:
        parts = self.parts(dialogue, row)
        attempted = parts["correct"] > 0 or parts["working"] > 0
        return [
            (self.correctness_weight, parts["correct"]),
            (self.format_weight, parts["boxed"] * attempted),
            (self.working_weight, parts["working"]),
            (-self.copy_weight, parts["copy"]),
        ]


def quantities(text: str) -> set[str]:
    """The distinct quantities written in ``text``, normalised by
    :func:`~dialogsim.rewards.math_verifier.normalize_answer` (``"1,000"`` → ``"1000"``, ``"18.00"`` → ``"18"``)."""
    return {normalize_answer(match) for match in _QUANTITY.findall(text)}


def f_score(found: set[str], expected: set[str], beta: float = WORKING_BETA) -> float:
    """F_β of ``found`` against ``expected``: (1 + β²)·P·R / (β²·P + R) with precision P = |found ∩ expected|
    / |found| and recall R = |found ∩ expected| / |expected|; β < 1 weighs precision more. In [0, 1];
    0 when the sets share nothing (or either is empty)."""
    common = len(found & expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(found), common / len(expected)
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def answer_is_boxed(replies: list[str]) -> bool:
    """Whether the most recent reply that states an answer explicitly puts it in a non-empty box."""
    for reply in reversed(replies):
        if extract_final_answer(reply, number_fallback=False) is not None:
            return last_boxed(reply) is not None
    return False


def copy_rate(reply: str, instruction: str, n: int = COPY_NGRAM) -> float:
    """Share of the reply's word n-grams that also occur in the instruction, in [0, 1].

    Words are runs of letters, digits and ``_`` after lower-casing, so punctuation and spacing do not matter;
    n-grams are counted with repetition. A verbatim copy of the instruction scores 1.0; a reply of fewer than
    ``n`` words has no n-gram and scores 0.0.

    Raises:
        ValueError: ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"copy_rate: the n-gram size n must be >= 1, got {n}")
    reply_ngrams = _ngrams(reply, n)
    if not reply_ngrams:
        return 0.0
    instruction_ngrams = set(_ngrams(instruction, n))
    return sum(gram in instruction_ngrams for gram in reply_ngrams) / len(reply_ngrams)


def _echoes_problem(replies: list[str], instruction: str) -> bool:
    """Whether no reply states an answer explicitly and the last number of the replies is one of the problem's."""
    if any(extract_final_answer(reply, number_fallback=False) is not None for reply in replies):
        return False
    numbers = [quantity for reply in replies for quantity in _QUANTITY.findall(reply)]
    return bool(numbers) and normalize_answer(numbers[-1]) in quantities(instruction)


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return [tuple(words[start : start + n]) for start in range(len(words) - n + 1)]
