"""The pairwise-judge contract: two dialogues of the same prompt and a turn h in, P(first is better) out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from dialogsim.messages import Message, truncate_to_turn
from dialogsim.prompts import PromptRow

ENDED_BEFORE_TURN = "ended_before_turn"


@dataclass(frozen=True)
class JudgePair:
    """Two dialogues that start from the same first user turn, to be compared at turn ``turn``.

    Attributes:
        first / second: complete dialogues (``{"role", "content"}`` messages); the judge reads each one
            truncated after its assistant reply of turn ``turn``. In ``refuel-evaluate`` ``first`` is the
            candidate's dialogue and ``second`` the baseline's.
        turn: h, 1-based.
        row: the prompt row both dialogues started from (a verifier reward reads its ``reference``).
    """

    first: list[Message]
    second: list[Message]
    turn: int
    row: PromptRow

    def __post_init__(self) -> None:
        if self.turn < 1:
            raise ValueError(f"JudgePair.turn is 1-based; got {self.turn} for prompt {self.row.id}")
        if first_user_message(self.first) != first_user_message(self.second):
            raise ValueError(
                f"JudgePair for prompt {self.row.id}: the two dialogues start with different user messages; "
                "pair dialogues of the same prompt (and the same simulated-user seed)"
            )

    def truncated(self) -> tuple[list[Message], list[Message]] | None:
        """Both dialogues up to the assistant reply of turn h, or ``None`` if either ended before it."""
        try:
            return truncate_to_turn(self.first, self.turn), truncate_to_turn(self.second, self.turn)
        except ValueError:
            return None


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one :class:`JudgePair`.

    Attributes:
        probability: P(first is better) in [0, 1] (1 first better, 0 second better, ½ a tie); NaN when
            no verdict could be reached.
        reason: why ``probability`` is NaN (e.g. ``"ended_before_turn"``, ``"unparsable_verdict"``);
            ``None`` for a valid judgement.
        details: judge-specific evidence, flat and JSON-serialisable (scores, verdicts per order, the
            judge's comparison text), shown in reports.
    """

    probability: float
    reason: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class PairwiseJudge(Protocol):
    """Compares two dialogues of one prompt at a turn h.

    Attributes:
        name: short label of the judge and its model, used for output folders (e.g. ``"reward-math"``).
    """

    name: str

    def judge(self, pairs: Sequence[JudgePair]) -> list[Judgement]:
        """One :class:`Judgement` per pair, in order; batched over all pairs.

        A pair whose verdict cannot be reached gets ``probability = NaN`` and a ``reason``; a judge
        never guesses a verdict.
        """
        ...


def first_user_message(dialogue: list[Message]) -> str | None:
    """Content of the first user message of a dialogue (``None`` if there is none)."""
    return next((message["content"] for message in dialogue if message["role"] == "user"), None)
