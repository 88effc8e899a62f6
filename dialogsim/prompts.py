"""The prompt row (one UltraInteract-format prompt that starts a dialogue) and the offline dialogue.

A row may script its dialogue beyond turn 1 (the replayed user, :class:`dialogsim.user.ReplayedUser`):
``meta["follow_ups"]`` holds the user messages of turns 2, 3, … and ``meta["turn_references"]`` the gold
answer of turns 1, 2, … (the per-turn reward, :mod:`dialogsim.rewards.turn_answer`). The arithmetic dialogues
(:mod:`dialogsim.arithmetic`) are such rows.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

from dialogsim.messages import Message, count_turns

FOLLOW_UPS = "follow_ups"  # meta key: the scripted user messages of turns 2, 3, … (a list of strings)
TURN_REFERENCES = "turn_references"  # meta key: the gold answer of turns 1, 2, … (a list of strings)


@dataclass(frozen=True)
class PromptRow:
    """One prompt in UltraInteract's format.

    Attributes:
        id: unique row id (UltraInteract's ``id``, or the shared file's sha256 id).
        task: UltraInteract task, e.g. ``"Math_CoT"``, ``"Coding"``, ``"Logic"``.
        dataset: source dataset, e.g. ``"gsm8k"``, ``"MATH"``, ``"mbpp"``.
        instruction: the first user message of the dialogue.
        reference: gold final answer (Math), test code (Coding) or answer span (Logic); ``None``
            when the source has none (hub ``_pair`` / ``_sft`` rows).
        split: source split (``"train"``, ``"test"``, ...), ``""`` when unknown.
        meta: any further source fields, e.g. ``source_solution`` for GSM8K, or a script of later turns
            (:data:`FOLLOW_UPS`, :data:`TURN_REFERENCES`).
    """

    id: str
    task: str
    dataset: str
    instruction: str
    reference: str | None = None
    split: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def follow_ups(self) -> tuple[str, ...]:
        """The scripted user messages of turns 2, 3, … (``meta["follow_ups"]``); empty when the row has none."""
        return tuple(self.meta.get(FOLLOW_UPS) or ())

    @property
    def turn_references(self) -> tuple[str, ...]:
        """The gold answer of turns 1, 2, … (``meta["turn_references"]``); empty when the row has none."""
        return tuple(self.meta.get(TURN_REFERENCES) or ())


def instruction_key(text: str) -> str:
    """Key under which two instructions are the same prompt: NFKC, case-folded, whitespace runs collapsed.

    Used to deduplicate prompts and to match an offline dialogue's first user message to its prompt row.
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def question_key(row: PromptRow) -> str:
    """Key under which two rows ask the same question: :func:`instruction_key` of every scripted user turn.

    The instruction, then the row's :attr:`~PromptRow.follow_ups`, one per line. For a row without follow-ups it
    is :func:`instruction_key` of the instruction; two scripted dialogues that open alike and go on differently
    are different questions. Used to deduplicate prompts and to keep generated training and held-out sets apart.
    """
    return "\n".join(instruction_key(text) for text in (row.instruction, *row.follow_ups))


@dataclass(frozen=True)
class OfflineDialogue:
    """A dialogue from a dataset whose prefixes serve as reset states (DR-PO-style dataset resets).

    The prefix s_k is the dialogue up to and including its k-th user message; a dataset reset
    restores s_k in the environment, the learner replies at turn h = k and the simulated user goes on
    from there. Load these with :func:`dialogsim.data.load_offline_dialogues`.

    Attributes:
        id: the dialogue's id (the source row's ``id``, else ``row-<index>``), recorded in the pairs.
        prompt_id: id of the prompt row it belongs to (the reward model scores against that row's
            ``reference``); the simulator's prompt table must hold it.
        messages: the longest usable prefix: an optional system message, then alternating user /
            assistant messages, ending with a user message (``turns`` user messages).
    """

    id: str
    prompt_id: str
    messages: tuple[Message, ...]

    @property
    def turns(self) -> int:
        """K: the number of user messages, i.e. the largest reset turn k this dialogue offers."""
        return count_turns(list(self.messages))

    def prefix(self, turn: int) -> list[Message]:
        """s_k: the messages up to and including the ``turn``-th user message (a fresh copy).

        Raises:
            ValueError: ``turn`` outside 1..turns.
        """
        if not 1 <= turn <= self.turns:
            raise ValueError(f"offline dialogue {self.id!r} has {self.turns} user messages; turn {turn} is not one")
        users = 0
        for index, message in enumerate(self.messages):
            users += message["role"] == "user"
            if users == turn:
                return [dict(m) for m in self.messages[: index + 1]]  # type: ignore[misc]
        raise AssertionError("unreachable: turn <= turns")
