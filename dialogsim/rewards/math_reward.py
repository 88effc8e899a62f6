"""A CPU reward for math dialogues: final-answer correctness plus similarity to the reference solution."""

from __future__ import annotations

from collections import Counter

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch
from dialogsim.rewards.embedding import SentenceEmbedder
from dialogsim.rewards.math_verifier import answers_match, extract_final_answer

SOLUTION_FIELDS = ("source_solution", "solution", "response")  # response: UltraInteract_sft


class MathAnswerReward:
    """Verifier-plus-embedding reward for ``Math*`` prompt rows (implements ``RewardModel``).

    Definition, for a dialogue τ started by row x::

        r(τ) = correctness_weight · 1[answer(τ) ≡ x.reference]
             + similarity_weight  · cos(e(last assistant message), e(reference solution))

    * ``answer(τ)`` is the final answer of the most recent assistant message that states one
      explicitly (``\\boxed{}``, "answer is", "####"), so later turns may restate or correct it; when no
      message does, the last number of the most recent assistant message that has one.
      ``≡`` is :func:`~dialogsim.rewards.math_verifier.answers_match` (normalised strings, then
      Math-Verify).
    * ``e`` is a unit-length sentence embedding (all-MiniLM-L6-v2 by default, 256-token truncation);
      the reference solution is ``x.meta["source_solution"]``, else ``x.meta["solution"]``, else
      ``x.meta["response"]`` (UltraInteract_sft), else ``x.reference``.

    Scale: unitless, in ``[-similarity_weight, correctness_weight + similarity_weight]``; with the
    defaults ``[-0.5, 1.5]``. The cosine measures topical overlap, not correctness: measured with
    all-MiniLM-L6-v2 on 40 GSM8K / 40 MATH rows, a bare ``\boxed{<correct answer>}`` reply scores
    ≈ 0.25 on average, another problem's solution 0.33 / 0.11, the problem statement itself 0.74 / 0.68.
    The cosines seen there lie in [-0.1, 0.9], so at the default weights a correct answer (+1.0)
    outweighs the similarity differences met in practice (< 0.5 · 1.0).

    NaN, with the reason counted in :attr:`failures`: ``"unsupported_task:<task>"`` (task not
    starting with ``"Math"``), ``"no_reference"`` (``row.reference`` is ``None``),
    ``"no_assistant_reply"``.

    Args:
        embedder: sentence embedder; ``None`` loads the embedded all-MiniLM-L6-v2 on the CPU.
        correctness_weight: weight of the answer indicator.
        similarity_weight: weight of the cosine similarity.
    """

    def __init__(
        self,
        embedder: SentenceEmbedder | None = None,
        correctness_weight: float = 1.0,
        similarity_weight: float = 0.5,
    ) -> None:
        self.embedder = SentenceEmbedder() if embedder is None else embedder
        self.correctness_weight = correctness_weight
        self.similarity_weight = similarity_weight
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per dialogue (see the class docstring); all embeddings in one encode call.

        Raises:
            ValueError: ``dialogues`` and ``rows`` differ in length.
        """
        check_batch(dialogues, rows, "MathAnswerReward")
        rewards = [float("nan")] * len(dialogues)
        scorable: list[int] = []
        for index, (dialogue, row) in enumerate(zip(dialogues, rows, strict=True)):
            reason = failure_reason(dialogue, row)
            if reason is None:
                scorable.append(index)
            else:
                self.failures[reason] += 1
        replies = [assistant_messages(dialogues[i])[-1] for i in scorable]
        solutions = [reference_solution(rows[i]) for i in scorable]
        similarities = self.embedder.similarity(replies, solutions)
        for index, similarity in zip(scorable, similarities, strict=True):
            correct = float(bool(self.correct(dialogues[index], rows[index])))
            rewards[index] = self.correctness_weight * correct + self.similarity_weight * similarity
        return rewards

    def correct(self, dialogue: list[Message], row: PromptRow) -> bool | None:
        """Whether the dialogue's final answer equals ``row.reference``.

        Returns:
            ``None`` when it cannot be decided (no reference or no assistant reply); ``False`` when
            no assistant message states an answer.
        """
        return dialogue_correct(dialogue, row)


def dialogue_correct(dialogue: list[Message], row: PromptRow) -> bool | None:
    """Whether the dialogue's final answer (:func:`dialogue_final_answer`) equals ``row.reference``.

    Returns:
        ``None`` when it cannot be decided (no reference or no assistant reply); ``False`` when
        no assistant message states an answer.
    """
    replies = assistant_messages(dialogue)
    if row.reference is None or not replies:
        return None
    answer = dialogue_final_answer(replies)
    return answer is not None and answers_match(answer, row.reference)


def dialogue_final_answer(replies: list[str]) -> str | None:
    """The answer of the most recent reply stating one explicitly, else the most recent last number.

    Args:
        replies: the assistant messages of a dialogue, oldest first.
    """
    for number_fallback in (False, True):
        for reply in reversed(replies):
            answer = extract_final_answer(reply, number_fallback=number_fallback)
            if answer is not None:
                return answer
    return None


def reference_solution(row: PromptRow) -> str:
    """The worked solution to compare replies with: ``meta["source_solution"]``, ``meta["solution"]``,
    ``meta["response"]`` (UltraInteract_sft) or, failing all three, ``row.reference``."""
    for field in SOLUTION_FIELDS:
        solution = row.meta.get(field)
        if isinstance(solution, str) and solution.strip():
            return solution
    return row.reference or ""


def assistant_messages(dialogue: list[Message]) -> list[str]:
    """The contents of the dialogue's assistant messages, oldest first."""
    return [message["content"] for message in dialogue if message["role"] == "assistant"]


def failure_reason(dialogue: list[Message], row: PromptRow) -> str | None:
    """Why a math reward cannot score this dialogue (``"unsupported_task:<task>"``, ``"no_reference"``,
    ``"no_assistant_reply"``), or ``None`` when it can."""
    if not row.task.startswith("Math"):
        return f"unsupported_task:{row.task}"
    if row.reference is None:
        return "no_reference"
    if not assistant_messages(dialogue):
        return "no_assistant_reply"
    return None
