"""The simulated user: question parsing, prompt rendering, batching, fallback and parse-rate accounting."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from doubles import FixedRepliesBackend

from dialogsim.backends.base import Completion
from dialogsim.backends.transformers_backend import TransformersBackend
from dialogsim.data import load_prompts
from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.sampling import SamplingParams
from dialogsim.user import (
    FALLBACK_QUESTION,
    MAX_QUESTION_WORDS,
    TEMPLATES,
    ReplayedUser,
    ScriptError,
    UserSimulator,
    UserTurn,
    parse_question,
    render_user_prompt,
)

DIALOGUE: list[Message] = [
    {"role": "system", "content": "SYSTEM-PROMPT-NOT-IN-TRANSCRIPT"},
    {"role": "user", "content": "What is 6 times 3?"},
    {"role": "assistant", "content": "It is 18."},
    {"role": "user", "content": "How did you get it?"},
    {"role": "assistant", "content": "I added 6 three times: 6 + 6 + 6 = 18."},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("reply", "marker", "expected"),
    [
        ("What is the next step?", None, "What is the next step?"),
        ("Student: Why did you divide by 2?", None, "Why did you divide by 2?"),
        ("student : why did you divide by 2?", None, "why did you divide by 2?"),
        ("Student:\nCan you explain the second step?", None, "Can you explain the second step?"),
        ('"Why did you multiply by 3?"', None, "Why did you multiply by 3?"),
        ('Student: "Why did you multiply by 3?"', None, "Why did you multiply by 3?"),
        ("I see. Why is it 5? And what about 6?", None, "Why is it 5?"),
        ("Thanks! That helps.\nBut where does the 24 come from? I am lost.", None, "But where does the 24 come from?"),
        (
            "Justification: The tutor skipped the division.\nQuestion: What is 48 divided by 2?",
            "Question:",
            "What is 48 divided by 2?",
        ),
        (
            "Justification: I want to know. Question: old?\nQuestion: Why is May half of April?",
            "Question:",
            "Why is May half of April?",
        ),
    ],
)
def test_parse_question_keeps_the_first_question(reply: str, marker: str | None, expected: str) -> None:
    """Labels and quotes are dropped and the first sentence ending with '?' (after the last marker) is kept."""
    assert parse_question(reply, marker) == expected


@pytest.mark.parametrize(
    ("reply", "marker"),
    [
        ("Thanks, that makes sense.", None),
        ("", None),
        ("Why?", None),
        ("Why " + "really " * MAX_QUESTION_WORDS + "so?", None),
        ("Justification: it is unclear. What is 48 divided by 2?", "Question:"),
        ("Justification: it is unclear.\nQuestion: I have no question.", "Question:"),
    ],
)
def test_parse_question_rejects_unusable_replies(reply: str, marker: str | None) -> None:
    """No question mark, one-word or too long questions, and a missing paper marker give None."""
    assert parse_question(reply, marker) is None


@pytest.mark.parametrize(
    ("reply", "marker"),
    [("**Student:** How did you get 12?", None), ("Justification: x.\n**Question:** How did you get 12?", "Question:")],
)
def test_parse_question_strips_markdown_bold_labels(reply: str, marker: str | None) -> None:
    """Markdown-bold labels are dropped like plain ones."""
    assert parse_question(reply, marker) == "How did you get 12?"


def test_render_student_prompt() -> None:
    """Student template: its system message, then one user message with header, labelled transcript in order, footer."""
    template = TEMPLATES["student"]
    prompt = render_user_prompt(template, DIALOGUE)
    assert [message["role"] for message in prompt] == ["system", "user"]
    assert prompt[0]["content"] == template.system
    body = prompt[1]["content"]
    assert body.startswith(template.header) and body.endswith(template.footer)
    lines = [
        "Student: What is 6 times 3?",
        "Tutor: It is 18.",
        "Student: How did you get it?",
        "Tutor: I added 6 three times: 6 + 6 + 6 = 18.",
    ]
    positions = [body.index(line) for line in lines]
    assert positions == sorted(positions)
    assert "SYSTEM-PROMPT-NOT-IN-TRANSCRIPT" not in body


def test_render_paper_prompt() -> None:
    """Paper template: no system message; '### user:' / '### assistant:' transcript; ends asking for 'Question:'."""
    template = TEMPLATES["paper"]
    prompt = render_user_prompt(template, DIALOGUE)
    assert [message["role"] for message in prompt] == ["user"]
    body = prompt[0]["content"]
    assert body.startswith("Below is a dialogue between the user and the assistant.")
    lines = [
        "### user: What is 6 times 3?",
        "### assistant: It is 18.",
        "### user: How did you get it?",
        "### assistant: I added 6 three times: 6 + 6 + 6 = 18.",
    ]
    positions = [body.index(line) for line in lines]
    assert positions == sorted(positions)
    assert body.rstrip().endswith("Question:")
    assert "SYSTEM-PROMPT-NOT-IN-TRANSCRIPT" not in body
    assert template.answer_marker == "Question:" and template.sampling.temperature == 0.01


def test_unknown_template_is_rejected() -> None:
    """An unknown template name raises ValueError listing the available ones."""
    with pytest.raises(ValueError, match=r"unknown user template 'teacher'.*paper.*student"):
        UserSimulator(FixedRepliesBackend([]), "teacher")


def test_user_simulator_counts_parsed_and_fallback_turns() -> None:
    """Parsed replies become the question, unusable ones the fallback; stats and parse_rate count both."""
    backend = FixedRepliesBackend(["Student: Why 18?", "I have nothing to ask.", "Is 6 + 6 + 6 really 18?"])
    user = UserSimulator(backend, "student")
    assert math.isnan(user.parse_rate)
    assert user.next_questions([], seed=0) == [] and backend.calls == []
    turns = user.next_questions([DIALOGUE[1:]] * 3, seed=5)
    assert turns == [
        UserTurn("Why 18?", parsed=True),
        UserTurn(FALLBACK_QUESTION, parsed=False),
        UserTurn("Is 6 + 6 + 6 really 18?", parsed=True),
    ]
    assert user.stats == {"parsed": 2, "fallback": 1}
    assert user.parse_rate == pytest.approx(2 / 3)
    ((prompts, sampling),) = backend.calls
    assert prompts == [render_user_prompt(TEMPLATES["student"], DIALOGUE[1:])] * 3
    assert sampling == TEMPLATES["student"].sampling.with_seed(5)


def test_user_simulator_passes_one_seed_per_dialogue() -> None:
    """seeds reach the backend as SamplingParams.seeds, one per dialogue; seed and seeds, or a wrong count, fail."""
    backend = FixedRepliesBackend(["Why 18?", "Why 6?"])
    user = UserSimulator(backend, "student")
    user.next_questions([DIALOGUE[1:3], DIALOGUE[1:]], seeds=[7, 7])
    ((_, sampling),) = backend.calls
    assert sampling == TEMPLATES["student"].sampling.with_seeds([7, 7])
    with pytest.raises(ValueError, match="not both"):
        user.next_questions([DIALOGUE[1:3]], seed=1, seeds=[1])
    with pytest.raises(ValueError, match="1 seeds for 2 dialogues"):
        user.next_questions([DIALOGUE[1:3], DIALOGUE[1:]], seeds=[1])


SCRIPTED = PromptRow(
    id="scripted",
    task="Math_CoT",
    dataset="arithmetic",
    instruction="What is 6 times 3?",
    reference="18",
    meta={"follow_ups": ["Now add 4 to that.", "Multiply that by 2."], "turn_references": ["18", "22", "44"]},
)
UNSCRIPTED = PromptRow(id="gsm8k-1", task="Math_CoT", dataset="gsm8k", instruction="What is 2 + 2?", reference="4")


def test_replayed_user_gives_the_rows_follow_up_for_the_next_turn_whatever_the_reply() -> None:
    user = ReplayedUser([SCRIPTED], max_horizon=3)
    assert math.isnan(user.parse_rate)
    after_turn_1 = [{"role": "user", "content": SCRIPTED.instruction}, {"role": "assistant", "content": "It is 17."}]
    after_turn_2 = [*after_turn_1, {"role": "user", "content": SCRIPTED.follow_ups[0]}, DIALOGUE[2]]
    turns = user.next_questions([after_turn_2, after_turn_1], seeds=[3, 9], rows=[SCRIPTED, SCRIPTED])
    assert turns == [UserTurn("Multiply that by 2.", parsed=True), UserTurn("Now add 4 to that.", parsed=True)]
    assert user.stats == {"parsed": 2} and user.parse_rate == 1.0
    with pytest.raises(ValueError, match="no rows for 1 dialogues"):
        user.next_questions([after_turn_1])
    past_the_script = [*after_turn_2, {"role": "user", "content": "And then?"}, DIALOGUE[2]]
    with pytest.raises(ScriptError, match="'scripted' scripts 2 follow-ups, none for turn 4"):
        user.next_questions([past_the_script], rows=[SCRIPTED])
    with pytest.raises(ScriptError, match="'gsm8k-1' is not among the rows"):
        user.next_questions([after_turn_1], rows=[UNSCRIPTED])


def test_replayed_user_refuses_rows_without_a_follow_up_for_every_turn_up_to_the_horizon() -> None:
    """Checked when it is built, which is before anything is generated; the message names the rows."""
    ReplayedUser([SCRIPTED, UNSCRIPTED], max_horizon=1)  # one turn: nothing to replay
    ReplayedUser([SCRIPTED], max_horizon=3)
    with pytest.raises(
        ScriptError, match=r"needs 1 scripted follow-ups .* 1 of 2 rows have fewer, e.g. 'gsm8k-1' \(0\)"
    ):
        ReplayedUser([SCRIPTED, UNSCRIPTED], max_horizon=2)
    with pytest.raises(ScriptError, match=r"needs 3 .* 'scripted' \(2\)"):
        ReplayedUser([SCRIPTED], max_horizon=4)


def test_user_simulator_with_tiny_model(tiny_model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the tiny model: one non-empty UserTurn per dialogue from one call, fallbacks counted, rate in [0, 1]."""
    backend = TransformersBackend(tiny_model_path, dtype="float32")
    batch_sizes: list[int] = []
    chat = backend.chat

    def counting_chat(conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        batch_sizes.append(len(conversations))
        return chat(conversations, sampling)

    monkeypatch.setattr(backend, "chat", counting_chat)
    user = UserSimulator(backend, "student", SamplingParams(temperature=0.01, max_new_tokens=8))
    dialogues = [DIALOGUE[1:3], DIALOGUE[1:], DIALOGUE[1:3]]
    turns = user.next_questions(dialogues, seed=0)
    assert batch_sizes == [3]
    assert len(turns) == len(dialogues)
    for turn in turns:
        assert turn.text.strip()
        assert turn.parsed or turn.text == FALLBACK_QUESTION
    assert user.stats["parsed"] + user.stats["fallback"] == len(dialogues)
    assert user.stats["fallback"] == sum(not turn.parsed for turn in turns)
    assert 0.0 <= user.parse_rate <= 1.0
    assert user.next_questions(dialogues, seed=0) == turns
    assert user.stats["parsed"] + user.stats["fallback"] == 2 * len(dialogues)


TUTOR_ANSWERS = {
    "72": "The answer is 72. I used division to find the May sales.",
    "10": "The answer is $10. I converted minutes to hours first.",
}


def test_student_template_with_the_real_model(smollm2_path: str, shared_prompts: Path) -> None:
    """SmolLM2-135M with the student template asks at least one parsable question on 2 real GSM8K dialogues."""
    rows, _ = load_prompts(shared_prompts, tasks=["Math_CoT"], datasets=["gsm8k"], limit=2)
    assert [row.reference for row in rows] == list(TUTOR_ANSWERS)
    dialogues: list[list[Message]] = [
        [{"role": "user", "content": row.instruction}, {"role": "assistant", "content": TUTOR_ANSWERS[row.reference]}]
        for row in rows
    ]
    sampling = replace(TEMPLATES["student"].sampling, max_new_tokens=64)
    user = UserSimulator(TransformersBackend(smollm2_path), "student", sampling)
    turns = user.next_questions(dialogues, seed=0)
    print(f"\nSmolLM2-135M student-template parse rate: {user.parse_rate:.2f} ({user.stats['parsed']}/{len(turns)})")
    for turn in turns:
        print(f"  parsed={turn.parsed}: {turn.text}")
    parsed = [turn.text for turn in turns if turn.parsed]
    assert parsed, "no parsable question from the real model"
    assert all(text.endswith("?") and len(text.split()) >= 2 for text in parsed)
    assert user.parse_rate == len(parsed) / len(turns)
