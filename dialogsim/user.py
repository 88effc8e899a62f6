"""The simulated user: turns a dialogue into the next user question.

Two kinds of user. :class:`UserSimulator` asks a user LLM, with one of two prompt templates (below).
:class:`ReplayedUser` (``user_template="replay"``) asks nothing: it replays each prompt row's scripted follow-ups
(``meta["follow_ups"]``), the user turns from data of the paper's second setting.

Two prompt templates are provided. ``paper`` is the prompt of the REFUEL paper (Gao et al., 2025,
arXiv 2410.04612, §5.1, made for Llama-3.1-70B-Instruct): a transcript, then a request for a
justification and the next question after ``Question:``. Small models do not follow it (measured on
4 GSM8K dialogues: 0 of 4 usable questions from SmolLM2-135M; README "The simulated user"), so the
default ``student`` template is a short role-play that small models follow. Either way the reply is
parsed to one question; when parsing fails the documented :data:`FALLBACK_QUESTION` is used, never an
empty user turn.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dialogsim.backends.base import ChatBackend
from dialogsim.messages import Message, count_turns
from dialogsim.prompts import FOLLOW_UPS, PromptRow
from dialogsim.sampling import SamplingParams

FALLBACK_QUESTION = "Can you check your last answer step by step and state the final answer clearly?"
REPLAY = "replay"  # the user_template of the replayed user (:class:`ReplayedUser`); no prompt template


@dataclass(frozen=True)
class UserTemplate:
    """How the user simulator's prompt is built and how its reply is parsed.

    Attributes:
        name: template name used in configs.
        system: optional system message.
        header: text before the transcript.
        footer: text after the transcript.
        user_label / assistant_label: speaker names in the transcript.
        answer_marker: the question follows the last occurrence of this marker (``None``: whole reply).
        sampling: default sampling for this template (temperature, cap, stop strings).
    """

    name: str
    system: str | None
    header: str
    footer: str
    user_label: str
    assistant_label: str
    answer_marker: str | None
    sampling: SamplingParams

    @classmethod
    def model_free(cls, name: str, sampling: SamplingParams) -> UserTemplate:
        """The template of a user that renders no prompt (a scripted or tabular user): only a name and sampling."""
        return cls(name, None, "", "", "", "", None, sampling)


TEMPLATES: dict[str, UserTemplate] = {
    "paper": UserTemplate(
        name="paper",
        system=None,
        header=(
            "Below is a dialogue between the user and the assistant. Pretend you are the user in this "
            "conversation. What question would you ask next? \n\n"
        ),
        footer=(
            "### Instructions: \nFIRST provide a justification of the question you want to ask. \n"
            "SECOND, on a new line, state only the question. Your response should use the format: \n"
            "Justification: \nQuestion: "
        ),
        user_label="### user: ",
        assistant_label="### assistant: ",
        answer_marker="Question:",
        sampling=SamplingParams(temperature=0.01, max_new_tokens=256),
    ),
    "student": UserTemplate(
        name="student",
        system="You are a student who is talking with a tutor.",
        header="Here is your conversation with the tutor so far:\n\n",
        footer=(
            "Write the next message you, the student, send to the tutor: one short follow-up question "
            "about the tutor's last answer. Reply with the question only."
        ),
        user_label="Student: ",
        assistant_label="Tutor: ",
        answer_marker=None,
        sampling=SamplingParams(temperature=0.01, max_new_tokens=96, repetition_penalty=1.2, stop=("?",)),
    ),
}


@dataclass(frozen=True)
class UserTurn:
    """One simulated user message and whether it was parsed from the model's reply."""

    text: str
    parsed: bool


def render_user_prompt(template: UserTemplate, dialogue: list[Message]) -> list[Message]:
    """The chat the user model sees: ``[system?, user(header + transcript + footer)]``."""
    lines = [
        (template.user_label if message["role"] == "user" else template.assistant_label) + message["content"]
        for message in dialogue
        if message["role"] != "system"
    ]
    prompt: list[Message] = [{"role": "system", "content": template.system}] if template.system else []
    prompt.append({"role": "user", "content": template.header + "\n\n".join(lines) + "\n\n" + template.footer})
    return prompt


_LABEL = re.compile(r"^\s*(?:\*\*)?(?:student|user|question|q)\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MAX_QUESTION_WORDS = 60


def parse_question(reply: str, answer_marker: str | None) -> str | None:
    """The first question in a user-model reply, or ``None`` if there is no usable one.

    Keeps the text after the last ``answer_marker`` (when given), drops speaker labels and quotes,
    and returns the first sentence that ends with ``?`` if it has 2 to :data:`MAX_QUESTION_WORDS`
    words.
    """
    text = reply
    if answer_marker is not None:
        if answer_marker not in text:
            return None
        text = text.rsplit(answer_marker, 1)[1]
    lines = [_LABEL.sub("", line.strip().lstrip("*")).strip().strip('"*').strip() for line in text.splitlines()]
    sentences = _SENTENCE_END.split(" ".join(line for line in lines if line))
    question = next((sentence.strip() for sentence in sentences if sentence.strip().endswith("?")), "")
    return question if 2 <= len(question.split()) <= MAX_QUESTION_WORDS else None


class UserSimulator:
    """Generates the next user message of many dialogues in one backend call.

    Args:
        backend: chat backend of the user model (independent of the policy's).
        template: a :class:`UserTemplate` or the name of one in :data:`TEMPLATES`.
        sampling: overrides the template's sampling settings.

    Attributes:
        stats: counts of ``parsed`` and ``fallback`` user turns (parse-success rate = parsed / total).
    """

    def __init__(
        self,
        backend: ChatBackend,
        template: UserTemplate | str = "student",
        sampling: SamplingParams | None = None,
    ) -> None:
        if isinstance(template, str):
            if template not in TEMPLATES:
                raise ValueError(f"unknown user template {template!r}; choose one of {sorted(TEMPLATES)}")
            template = TEMPLATES[template]
        self.backend = backend
        self.template = template
        self.sampling = sampling or template.sampling
        self.stats: Counter[str] = Counter()

    def next_questions(
        self,
        dialogues: list[list[Message]],
        seed: int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        rows: Sequence[PromptRow] | None = None,
    ) -> list[UserTurn]:
        """One user turn per dialogue (each ending with an assistant reply), from one batched call.

        Args:
            dialogues: the dialogues, each ending with an assistant reply.
            seed: one seed for the call (:attr:`SamplingParams.seed`): reproducible for the same batch.
            seeds: one seed per dialogue, in ``[0, 2**31)`` (:attr:`SamplingParams.seeds`): dialogue i's
                turn depends only on (dialogue i, ``seeds[i]``), whatever else is in the batch (common
                random numbers; the simulator passes these). Exclusive with ``seed``.
            rows: the prompt row that started each dialogue (the simulator passes them); the user model
                sees only the dialogue, so they are not read here (:class:`ReplayedUser` reads them).

        Raises:
            ValueError: both ``seed`` and ``seeds``, or not one seed per dialogue.
        """
        _check_seeds(len(dialogues), seed, seeds)
        if not dialogues:
            return []
        prompts = [render_user_prompt(self.template, dialogue) for dialogue in dialogues]
        sampling = self.sampling.with_seed(seed) if seeds is None else self.sampling.with_seeds(seeds)
        completions = self.backend.chat(prompts, sampling)
        turns = []
        for completion in completions:
            question = parse_question(completion.text, self.template.answer_marker)
            turns.append(UserTurn(text=question or FALLBACK_QUESTION, parsed=question is not None))
            self.stats["parsed" if question is not None else "fallback"] += 1
        return turns

    @property
    def parse_rate(self) -> float:
        """Fraction of user turns parsed from the model's reply (NaN before the first call)."""
        total = self.stats["parsed"] + self.stats["fallback"]
        return self.stats["parsed"] / total if total else float("nan")


class SimulatedUser(Protocol):
    """What :class:`~dialogsim.simulator.DialogueSimulator` needs of a user: :class:`UserSimulator` (a user LLM),
    :class:`ReplayedUser` (scripted turns) or the tabular MDP's user (:class:`envs.tabular.simulator.TabularUser`).

    Attributes:
        backend: the engine, fingerprinted by its ``name``.
        template: the prompt template, fingerprinted by its ``name``.
        sampling: the sampling settings, fingerprinted.
        stats: counts of ``parsed`` and ``fallback`` user turns.
    """

    backend: Any
    template: UserTemplate
    sampling: SamplingParams
    stats: Counter[str]

    def next_questions(
        self,
        dialogues: list[list[Message]],
        seed: int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        rows: Sequence[PromptRow] | None = None,
    ) -> list[UserTurn]:
        """One user turn per dialogue; ``seeds[i]`` seeds dialogue i's turn, ``rows[i]`` is its prompt row."""
        ...

    @property
    def parse_rate(self) -> float:
        """Fraction of user turns that are usable questions (not the fallback)."""
        ...


class ScriptError(ValueError):
    """A prompt row has no scripted user message for a turn the replayed user must give."""


class ReplayedUser:
    """Replays each prompt row's scripted user turns (``row.meta["follow_ups"]``): no model, no sampling.

    The paper's second setting, in spirit: the user turns come from data instead of a simulator. The user
    message of turn h + 1 (h ≥ 1) of a dialogue started by row x is ``x.follow_ups[h - 1]``, whatever the
    policy replied, so a follow-up that operates on the previous answer ("Now add 17 to that.") makes a wrong
    earlier answer cost the later turns. Select it with ``user_template="replay"`` (``--user_template replay``);
    no user model is loaded.

    Snapshots, resets and common random numbers hold trivially: the replayed turn depends only on (row, h),
    so a restored snapshot and both branches of a pair get the same next user message. The seeds the
    simulator draws from each dialogue's RNG are accepted and not used, so the RNG advances exactly as with
    :class:`UserSimulator`.

    Args:
        rows: the prompt rows dialogues start from.
        max_horizon: the largest horizon H; every row needs a follow-up for each turn 2..H.

    Raises:
        ScriptError: before anything is generated, rows without a follow-up for some turn 2..H (their ids,
            the first :data:`SHOWN_IDS` of them, and how many follow-ups they have).

    Attributes:
        backend: ``self`` (the simulator fingerprints the user by ``backend.name``).
        name: ``"replay"``.
        template: a :class:`UserTemplate` named ``"replay"`` (no prompt is rendered).
        sampling: nominal (greedy, one token): nothing is sampled.
        stats: ``parsed`` count (every replayed turn counts as parsed, so :attr:`parse_rate` is 1).
    """

    SHOWN_IDS = 5

    def __init__(self, rows: Sequence[PromptRow], max_horizon: int) -> None:
        short = [row for row in rows if len(row.follow_ups) < max_horizon - 1]
        if short:
            listed = ", ".join(f"{row.id!r} ({len(row.follow_ups)})" for row in short[: self.SHOWN_IDS])
            raise ScriptError(
                f"the replayed user needs {max_horizon - 1} scripted follow-ups per row (meta['{FOLLOW_UPS}'], "
                f"turns 2..{max_horizon}) for max_horizon {max_horizon}; {len(short)} of {len(rows)} rows have fewer, "
                f"e.g. {listed}; lower the horizon, drop those rows, or use an LLM user (--user_template student)"
            )
        self.scripts = {row.id: row.follow_ups for row in rows}
        self.name = REPLAY
        self.backend = self
        self.sampling = SamplingParams(temperature=0.0, max_new_tokens=1)
        self.template = UserTemplate.model_free(REPLAY, self.sampling)
        self.stats: Counter[str] = Counter()

    def next_questions(
        self,
        dialogues: list[list[Message]],
        seed: int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        rows: Sequence[PromptRow] | None = None,
    ) -> list[UserTurn]:
        """The scripted user message that follows each dialogue (each ending with the turn-h reply): follow-up h.

        Args:
            dialogues: the dialogues, each ending with an assistant reply.
            seed / seeds: as for :meth:`UserSimulator.next_questions`; checked, not used.
            rows: the prompt row that started each dialogue; required.

        Raises:
            ValueError: no ``rows``, not one row per dialogue, both ``seed`` and ``seeds``, or not one seed per
                dialogue.
            ScriptError: a row this user was not built with, or without follow-up h (a dialogue past its script).
        """
        _check_seeds(len(dialogues), seed, seeds)
        if rows is None or len(rows) != len(dialogues):
            count = "no rows" if rows is None else f"{len(rows)} rows"
            raise ValueError(
                f"the replayed user reads each dialogue's follow-ups from its prompt row; got {count} for "
                f"{len(dialogues)} dialogues (DialogueSimulator passes them)"
            )
        turns = []
        for dialogue, row in zip(dialogues, rows, strict=True):
            if row.id not in self.scripts:
                raise ScriptError(f"prompt row {row.id!r} is not among the rows this replayed user was built with")
            script, turn = self.scripts[row.id], count_turns(dialogue)
            if turn > len(script):
                raise ScriptError(
                    f"prompt row {row.id!r} scripts {len(script)} follow-ups, none for turn {turn + 1}; "
                    "the dialogue went past its script"
                )
            turns.append(UserTurn(text=script[turn - 1], parsed=True))
        self.stats["parsed"] += len(turns)
        return turns

    @property
    def parse_rate(self) -> float:
        """1.0 once a turn was replayed (every replayed turn is a usable question); NaN before."""
        return 1.0 if self.stats["parsed"] else float("nan")


def _check_seeds(count: int, seed: int | None, seeds: Sequence[int] | None) -> None:
    """Refuse both ``seed`` and ``seeds``, or ``seeds`` not one per dialogue (ValueError)."""
    if seed is not None and seeds is not None:
        raise ValueError("next_questions takes seed (one for the call) or seeds (one per dialogue), not both")
    if seeds is not None and len(seeds) != count:
        raise ValueError(f"next_questions got {len(seeds)} seeds for {count} dialogues; give one each")
