"""The simulated user: turns a dialogue into the next user question.

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

from dialogsim.backends.base import ChatBackend
from dialogsim.messages import Message
from dialogsim.sampling import SamplingParams

FALLBACK_QUESTION = "Can you check your last answer step by step and state the final answer clearly?"


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
        self, dialogues: list[list[Message]], seed: int | None = None, *, seeds: Sequence[int] | None = None
    ) -> list[UserTurn]:
        """One user turn per dialogue (each ending with an assistant reply), from one batched call.

        Args:
            dialogues: the dialogues, each ending with an assistant reply.
            seed: one seed for the call (:attr:`SamplingParams.seed`): reproducible for the same batch.
            seeds: one seed per dialogue, in ``[0, 2**31)`` (:attr:`SamplingParams.seeds`): dialogue i's
                turn depends only on (dialogue i, ``seeds[i]``), whatever else is in the batch (common
                random numbers; the simulator passes these). Exclusive with ``seed``.

        Raises:
            ValueError: both ``seed`` and ``seeds``, or not one seed per dialogue.
        """
        if seed is not None and seeds is not None:
            raise ValueError("next_questions takes seed (one for the call) or seeds (one per dialogue), not both")
        if seeds is not None and len(seeds) != len(dialogues):
            raise ValueError(f"next_questions got {len(seeds)} seeds for {len(dialogues)} dialogues; give one each")
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
