"""The pairwise LLM judge: a chat model compares two dialogues, in both orders, and names the better one.

The prompt follows the shape of the GPT-4 judge prompt used for per-turn win rates in the REFUEL
paper (Gao et al., arXiv 2410.04612; a one-sentence comparison, then only "A" or "B" on its own line),
adapted to two whole dialogues that share their first user message. The wording is our own.

Position bias is cancelled by judging every pair twice, once with each dialogue shown first, and
averaging: P(first is better) = ½·[verdict with first shown as A is "A"] + ½·[verdict with first shown
as B is "B"]. A judge that always answers "A" therefore scores every pair ½. A verdict that cannot be
parsed is counted (``reason = "unparsable_verdict"``), never guessed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.judges.base import ENDED_BEFORE_TURN, Judgement, JudgePair
from dialogsim.messages import Message
from dialogsim.sampling import SamplingParams

UNPARSABLE = "unparsable_verdict"
JUDGE_PROMPT = """\
Below are two conversations between a user and an AI assistant. Both start with the same first user \
message; later user messages may differ, because the user reacted to different answers.

Which assistant helped the user more over its whole conversation? Judge whether its answers are correct, \
clear and respond to what the user asked. Do not favour a conversation for being longer or for the order \
in which it is shown.

### Conversation A
{conversation_a}

### Conversation B
{conversation_b}

{instructions}"""
INSTRUCTIONS = {
    "compare": "First compare the two assistants in one or two sentences. Then, on a last line of its own, write "
    "only the letter of the better conversation: A or B. Use this format:\nComparison: <your comparison>\n"
    "Better: <A or B>",
    "letter": "Reply with one letter only, the better conversation: A or B.",
}
DEFAULT_SAMPLING = SamplingParams(temperature=0.0, max_new_tokens=192, seed=0)
_SPEAKERS = {"user": "User", "assistant": "Assistant", "system": "System"}
_LETTER = r"\W*(?:(?i:conversation)\s+)?(?P<letter>[AB])[\W_]*$"
_VERDICT_LINE = re.compile(r"^[\W_]*(?:(?i:better|verdict|answer|winner)\s*:?\s*)?" + _LETTER)
_VERDICT_SUFFIX = re.compile(r"(?i:better)\s*:" + _LETTER)
_COMPARISON_LABEL = re.compile(r"^[*_\s]*comparison[*_\s]*:[*_\s]*", re.IGNORECASE)


def render_transcript(dialogue: list[Message]) -> str:
    """A dialogue as plain text: ``User: ...`` / ``Assistant: ...`` paragraphs."""
    return "\n\n".join(f"{_SPEAKERS[message['role']]}: {message['content'].strip()}" for message in dialogue)


def judge_prompt(
    conversation_a: list[Message], conversation_b: list[Message], template: str = "compare"
) -> list[Message]:
    """The chat sent to the judge model: one user message, :data:`JUDGE_PROMPT` with ``template``'s instructions.

    Raises:
        ValueError: unknown ``template`` (the message lists :data:`INSTRUCTIONS`).
    """
    check_template(template)
    content = JUDGE_PROMPT.format(
        conversation_a=render_transcript(conversation_a),
        conversation_b=render_transcript(conversation_b),
        instructions=INSTRUCTIONS[template],
    )
    return [{"role": "user", "content": content}]


def check_template(template: str) -> None:
    """Raise ``ValueError`` unless ``template`` names one of :data:`INSTRUCTIONS`."""
    if template not in INSTRUCTIONS:
        raise ValueError(f"unknown judge template {template!r}; choose one of {', '.join(INSTRUCTIONS)}")


def parse_verdict(reply: str) -> tuple[str | None, str]:
    """The verdict ("A" / "B") and the comparison text of a judge reply.

    The verdict is read from the last non-empty line only: either the line is just the letter, optionally
    after a label (``"B"``, ``"**A**"``, ``"Better: A"``, ``"Verdict: Conversation B."``), or it ends with
    ``"Better: <letter>"``. Anything else (no such line, ``"A or B"``, a letter in the middle of prose) is
    unparsable.

    Returns:
        ``(verdict or None, comparison)``: the comparison is the reply without the verdict and without a
        leading ``"Comparison:"`` label; when the verdict is unparsable, the whole reply, stripped.
    """
    lines = reply.strip().splitlines()
    if not lines:
        return None, ""
    last = lines[-1].strip()
    match = _VERDICT_LINE.match(last)
    if match:
        return match.group("letter"), _comparison("\n".join(lines[:-1]))
    match = _VERDICT_SUFFIX.search(last)
    if match:
        return match.group("letter"), _comparison("\n".join([*lines[:-1], last[: match.start()]]))
    return None, reply.strip()


def _comparison(text: str) -> str:
    return _COMPARISON_LABEL.sub("", text.strip()).strip()


def swap_averaged(verdict_ab: str | None, verdict_ba: str | None) -> float:
    """P(first is better) from the verdicts with the first dialogue shown as A (``ab``) and as B (``ba``).

    Returns:
        ½·[verdict_ab == "A"] + ½·[verdict_ba == "B"]: 1, ½ or 0; NaN if either verdict is ``None``.
    """
    if verdict_ab is None or verdict_ba is None:
        return math.nan
    return 0.5 * (verdict_ab == "A") + 0.5 * (verdict_ba == "B")


class LLMJudge:
    """Pairwise judge on any chat backend (implements :class:`~dialogsim.judges.base.PairwiseJudge`).

    For each pair, the dialogues truncated at turn h are shown in both orders (two prompts, all pairs in
    one ``backend.chat`` call); see the module docstring for the averaging. ``details`` holds
    ``verdict_ab`` / ``verdict_ba`` (``"A"``, ``"B"`` or ``None``; ``ab`` = the first dialogue shown as
    A) and ``comparison_ab`` / ``comparison_ba`` (the judge's comparison text). Position bias shows as
    ``verdict_ab == verdict_ba`` (the same slot won in both orders, giving ½).

    NaN reasons: ``"ended_before_turn"``, ``"unparsable_verdict"`` (either order's reply had no verdict,
    or was cut by the token cap: its last line may be a fragment such as the "A" of "A: ...").

    Args:
        backend: any :class:`~dialogsim.backends.base.ChatBackend` (``transformers``, ``vllm``, or an
            OpenAI-compatible server via ``dialogsim.backends.factory.build_backend("openai", ...)``).
        name: label of the judge, e.g. ``"llm-gpt-4o"``.
        sampling: judge sampling; default greedy, 192 new tokens.
        template: ``"compare"`` (the paper-style comparison, then the letter; the default) or ``"letter"``
            (the letter only, for small models that cannot keep the format; measured on SmolLM2-135M:
            "compare" replies were unparsable, "letter" replies parsed but always named slot A).

    Raises:
        ValueError: unknown ``template``.
    """

    def __init__(
        self,
        backend: ChatBackend,
        name: str = "llm",
        sampling: SamplingParams | None = None,
        template: str = "compare",
    ) -> None:
        check_template(template)
        self.backend = backend
        self.name = name
        self.sampling = sampling or DEFAULT_SAMPLING
        self.template = template

    def judge(self, pairs: Sequence[JudgePair]) -> list[Judgement]:
        """One judgement per pair (see the class docstring)."""
        truncations = [pair.truncated() for pair in pairs]
        judged = [dialogues for dialogues in truncations if dialogues is not None]
        prompts = [
            judge_prompt(a, b, self.template) for first, second in judged for a, b in ((first, second), (second, first))
        ]
        replies = iter(self.backend.chat(prompts, self.sampling) if prompts else [])
        judgements = []
        for dialogues in truncations:
            if dialogues is None:
                judgements.append(Judgement(math.nan, ENDED_BEFORE_TURN))
                continue
            verdict_ab, comparison_ab = _verdict(next(replies))  # first dialogue shown as A
            verdict_ba, comparison_ba = _verdict(next(replies))  # first dialogue shown as B
            probability = swap_averaged(verdict_ab, verdict_ba)
            details = {
                "verdict_ab": verdict_ab,
                "verdict_ba": verdict_ba,
                "comparison_ab": comparison_ab,
                "comparison_ba": comparison_ba,
            }
            judgements.append(Judgement(probability, UNPARSABLE if math.isnan(probability) else None, details))
        return judgements


def _verdict(completion: Completion) -> tuple[str | None, str]:
    """:func:`parse_verdict` of a complete reply; a reply cut by the token cap has no verdict."""
    if completion.finish_reason == "length":
        return None, completion.text.strip()
    return parse_verdict(completion.text)
