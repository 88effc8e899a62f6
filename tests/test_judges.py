"""Pairwise judges: verdict parsing, swap averaging, the reward-model judge, real chat models as judges."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from doubles import AnsweringBackend, LengthReward

from dialogsim.backends.base import ChatBackend, Completion
from dialogsim.backends.transformers_backend import TransformersBackend
from dialogsim.judges import Judgement, JudgePair, LLMJudge, PairwiseJudge, RewardModelJudge
from dialogsim.judges.factory import build_judge, judge_label
from dialogsim.judges.llm_judge import judge_prompt, parse_verdict, render_transcript, swap_averaged
from dialogsim.judges.reward_judge import pairwise_outcome
from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.sampling import SamplingParams
from refuel.evaluation.winrate import judge_statistics, per_turn_win_rates

ROW = PromptRow(id="p", task="Math_CoT", dataset="gsm8k", instruction="What is 6 times 3?", reference="18")


def dialogue(*replies: str, question: str = ROW.instruction) -> list[Message]:
    """User question, then for each reply: the reply and (between replies) a follow-up question."""
    messages: list[Message] = []
    for index, reply in enumerate(replies):
        messages.append({"role": "user", "content": question if index == 0 else f"follow-up {index}?"})
        messages.append({"role": "assistant", "content": reply})
    return messages


# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "verdict", "comparison"),
    [
        ("Comparison: A gives 18, B gives 19.\nBetter: A", "A", "A gives 18, B gives 19."),
        ("Both are fine but B explains more.\n\nB", "B", "Both are fine but B explains more."),
        ("**Comparison:** B is right.\n**Better:** **B**", "B", "B is right."),
        ("Comparison: same.\nVerdict: Conversation A.", "A", "same."),
        ("A is correct. Better: A", "A", "A is correct."),
        ("Comparison: x\nBetter: B\n", "B", "x"),
    ],
)
def test_parse_verdict_reads_the_last_line(reply: str, verdict: str, comparison: str) -> None:
    assert parse_verdict(reply) == (verdict, comparison)


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "Comparison: A is right.\nBetter: A or B",
        "Better: <A or B>",
        "Better: A\nBecause A is right.",  # the verdict must be the last line
        "I think conversation A is better",  # a letter inside prose is not a verdict
        "a",  # lower-case letters are words, not verdicts
        "Better: C",
    ],
)
def test_unparsable_verdicts_are_not_guessed(reply: str) -> None:
    verdict, comparison = parse_verdict(reply)
    assert verdict is None
    assert comparison == reply.strip()


def test_swap_averaging_table() -> None:
    assert swap_averaged("A", "B") == 1.0  # first dialogue won in both orders
    assert swap_averaged("B", "A") == 0.0
    assert swap_averaged("A", "A") == 0.5  # position bias: slot A won both times
    assert swap_averaged("B", "B") == 0.5
    assert math.isnan(swap_averaged(None, "B")) and math.isnan(swap_averaged("A", None))


def test_pairwise_outcome_win_loss_tie_and_nan() -> None:
    assert [pairwise_outcome(2.0, 1.0), pairwise_outcome(1.0, 2.0), pairwise_outcome(1.0, 1.0)] == [1.0, 0.0, 0.5]
    assert pairwise_outcome(1.05, 1.0, tie_tolerance=0.1) == 0.5
    assert math.isnan(pairwise_outcome(math.nan, 1.0)) and math.isnan(pairwise_outcome(1.0, math.nan))
    with pytest.raises(ValueError, match="tie_tolerance"):
        pairwise_outcome(1.0, 2.0, tie_tolerance=-1.0)


# --- pairs --------------------------------------------------------------------------------------


def test_judge_pair_checks_turn_and_shared_first_user_turn() -> None:
    with pytest.raises(ValueError, match="1-based"):
        JudgePair(dialogue("x"), dialogue("y"), 0, ROW)
    with pytest.raises(ValueError, match="different user messages"):
        JudgePair(dialogue("x"), dialogue("y", question="Another prompt?"), 1, ROW)
    pair = JudgePair(dialogue("x1", "x2"), dialogue("y1"), 1, ROW)
    assert pair.truncated() == (dialogue("x1"), dialogue("y1"))
    assert JudgePair(dialogue("x1", "x2"), dialogue("y1"), 2, ROW).truncated() is None


# --- the LLM judge with scripted backends ----------------------------------------------------------


def test_always_a_judge_gives_fifty_percent_and_full_position_bias() -> None:
    """A judge that always answers "A" is pure position bias: swap averaging turns every pair into a tie."""
    backend = AnsweringBackend(lambda prompt: "Comparison: the first one.\nBetter: A")
    judge = LLMJudge(backend, name="always-a")
    assert isinstance(backend, ChatBackend) and isinstance(judge, PairwiseJudge)
    pairs = [
        JudgePair(dialogue(f"good {i}", "x"), dialogue(f"bad {i}", "y"), turn, ROW) for i in range(5) for turn in (1, 2)
    ]
    judgements = judge.judge(pairs)
    assert [j.probability for j in judgements] == [0.5] * 10
    assert len(backend.prompts) == 20  # both orders of every pair, in one call
    frame = pd.DataFrame(
        [
            {"method": "m", "prompt_id": f"p{i // 2}", "turn": pair.turn, "outcome": j.probability, **j.details}
            for i, (pair, j) in enumerate(zip(pairs, judgements, strict=True))
        ]
    )
    rates = per_turn_win_rates(frame, n_resamples=200)
    assert rates["win_rate"].tolist() == [50.0, 50.0, 50.0]
    stats = judge_statistics(frame).set_index("method")
    assert stats.loc["m", "position_bias_rate"] == 100.0 and stats.loc["m", "first_slot_rate"] == 100.0
    assert stats.loc["m", "tie_rate"] == 100.0 and stats.loc["m", "unparsable_verdicts"] == 0


def test_consistent_judge_orders_and_swaps_the_dialogues() -> None:
    """A judge that prefers the reply saying 18 wins it in both orders; prompts show A then B."""

    def prefer_18(prompt: str) -> str:
        a_part = prompt.split("### Conversation A", 1)[1].split("### Conversation B", 1)[0]
        return "Comparison: one says 18.\nBetter: " + ("A" if "18" in a_part else "B")

    backend = AnsweringBackend(prefer_18)
    pairs = [
        JudgePair(dialogue("It is 18."), dialogue("It is 19."), 1, ROW),
        JudgePair(dialogue("It is 19."), dialogue("It is 18."), 1, ROW),
    ]
    first, second = LLMJudge(backend).judge(pairs)
    assert (first.probability, second.probability) == (1.0, 0.0)
    assert first.details == {
        "verdict_ab": "A",
        "verdict_ba": "B",
        "comparison_ab": "one says 18.",
        "comparison_ba": "one says 18.",
    }
    shown_first = backend.prompts[0].split("### Conversation A", 1)[1].split("### Conversation B", 1)
    assert "It is 18." in shown_first[0] and "It is 19." in shown_first[1]
    assert "It is 19." in backend.prompts[1].split("### Conversation B", 1)[0]


def test_unparsable_and_ended_dialogues_are_nan_with_reasons() -> None:
    backend = AnsweringBackend(lambda prompt: "I cannot decide.")
    pairs = [JudgePair(dialogue("x"), dialogue("y"), 1, ROW), JudgePair(dialogue("x"), dialogue("y"), 2, ROW)]
    unparsable, ended = LLMJudge(backend).judge(pairs)
    assert math.isnan(unparsable.probability) and unparsable.reason == "unparsable_verdict"
    assert unparsable.details["verdict_ab"] is None and unparsable.details["comparison_ab"] == "I cannot decide."
    assert math.isnan(ended.probability) and ended.reason == "ended_before_turn"
    assert len(backend.prompts) == 2  # the pair that ended before turn 2 is not sent


def test_reply_cut_by_the_token_cap_has_no_verdict() -> None:
    """A reply stopped by max_new_tokens may end in a fragment ("A" of "A: ...") that looks like a verdict."""

    class CutBackend:
        def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
            return [Completion("A: it says 18\nA", (), (), "length") for _ in conversations]

    (judgement,) = LLMJudge(CutBackend()).judge([JudgePair(dialogue("x"), dialogue("y"), 1, ROW)])
    assert math.isnan(judgement.probability) and judgement.reason == "unparsable_verdict"
    assert judgement.details["comparison_ab"] == "A: it says 18\nA"


def test_letter_template_asks_for_the_letter_only() -> None:
    backend = AnsweringBackend(lambda prompt: "B")
    (judgement,) = LLMJudge(backend, template="letter").judge([JudgePair(dialogue("x"), dialogue("y"), 1, ROW)])
    assert judgement.probability == 0.5 and judgement.details["verdict_ab"] == "B"
    assert backend.prompts[0].endswith("Reply with one letter only, the better conversation: A or B.")
    with pytest.raises(ValueError, match="unknown judge template 'long'; choose one of compare, letter"):
        LLMJudge(backend, template="long")


def test_judge_prompt_holds_both_transcripts_and_the_format() -> None:
    messages = judge_prompt(dialogue("one", "two"), dialogue("uno"))
    assert [m["role"] for m in messages] == ["user"]
    text = messages[0]["content"]
    assert text.index(render_transcript(dialogue("one", "two"))) < text.index(render_transcript(dialogue("uno")))
    assert text.rstrip().endswith("Better: <A or B>")
    assert "User: What is 6 times 3?\n\nAssistant: one\n\nUser: follow-up 1?" in text


# --- the reward-model judge -----------------------------------------------------------------------


def test_reward_judge_scores_each_truncation_once_and_compares() -> None:
    reward = LengthReward()
    judge = RewardModelJudge(reward, name="reward-length")
    baseline = dialogue("bb", "bbb")
    pairs = [
        JudgePair(dialogue("ccc", "c"), baseline, 1, ROW),  # win at h=1
        JudgePair(dialogue("ccc", "c"), baseline, 2, ROW),  # loss at h=2
        JudgePair(dialogue("cc"), baseline, 1, ROW),  # tie
        JudgePair(dialogue("nan"), baseline, 1, ROW),  # the reward failed
        JudgePair(dialogue("cc"), baseline, 2, ROW),  # the candidate ended before h=2
    ]
    judgements = judge.judge(pairs)
    assert [j.probability for j in judgements[:3]] == [1.0, 0.0, 0.5]
    assert judgements[0].details == {"score_first": 3.0, "score_second": 2.0}
    assert math.isnan(judgements[3].probability) and judgements[3].reason == "reward_nan"
    assert math.isnan(judgements[4].probability) and judgements[4].reason == "ended_before_turn"
    assert len(reward.calls) == 1
    scored = reward.calls[0]
    assert len(scored) == 6  # ccc, bb, ccc+c, bb+bbb, cc, nan: the baseline's truncations once each
    assert scored.count(dialogue("bb")) == 1


def test_build_judge_and_labels(tiny_model_path: str) -> None:
    assert judge_label("llm", "runs/x/iteration_0/policy/") == "llm-policy"
    assert judge_label("reward", "RLHFlow/ArmoRM-Llama3-8B-v0.1") == "reward-ArmoRM-Llama3-8B-v0.1"
    reward_judge = build_judge("reward", reward="none")
    assert isinstance(reward_judge, RewardModelJudge) and reward_judge.name == "reward-none"
    llm_judge = build_judge("llm", model=tiny_model_path)
    assert isinstance(llm_judge, LLMJudge) and isinstance(llm_judge.backend, TransformersBackend)
    assert llm_judge.name == f"{judge_label('llm', tiny_model_path)}-compare"
    with pytest.raises(ValueError, match="--judge gpt: unknown judge; choose one of reward, llm"):
        build_judge("gpt")
    with pytest.raises(ValueError, match="base_url"):
        build_judge("llm", backend="openai", model="gpt-4o")


# --- real chat models as judges -------------------------------------------------------------------


def test_tiny_random_model_judge_runs_and_counts_unparsable(tiny_model_path: str, one_torch_thread: None) -> None:
    """Plumbing through a real TransformersBackend: every judgement is a swap average or NaN with a reason."""
    judge = LLMJudge(TransformersBackend(tiny_model_path), sampling=SamplingParams(temperature=0.0, max_new_tokens=8))
    pairs = [JudgePair(dialogue("It is 18."), dialogue("It is 19."), 1, ROW)] * 2
    judgements = judge.judge(pairs)
    assert len(judgements) == 2
    for judgement in judgements:
        assert isinstance(judgement, Judgement)
        if math.isnan(judgement.probability):
            assert judgement.reason == "unparsable_verdict"
        else:
            assert judgement.probability in (0.0, 0.5, 1.0) and judgement.reason is None
        assert set(judgement.details) == {"verdict_ab", "verdict_ba", "comparison_ab", "comparison_ba"}


@pytest.mark.slow
def test_smollm2_judge_end_to_end(smollm2_path: str, one_torch_thread: None) -> None:
    """The real SmolLM2-135M-Instruct judges right vs wrong answers in both orders with the letter template.

    Measured: it parses (mostly "A", i.e. position bias, which swap averaging turns into ties); the test checks
    the plumbing and that verdicts are parsed from a real model, not the model's quality.
    """
    judge = LLMJudge(
        TransformersBackend(smollm2_path), sampling=SamplingParams(temperature=0.0, max_new_tokens=8), template="letter"
    )
    right = dialogue("6 times 3 is 6 + 6 + 6 = 18. The answer is 18.")
    wrong = dialogue("6 times 3 is 6 + 6 = 12. The answer is 12.")
    judgements = judge.judge([JudgePair(right, wrong, 1, ROW), JudgePair(wrong, right, 1, ROW)])
    verdicts = [j.details[key] for j in judgements for key in ("verdict_ab", "verdict_ba")]
    assert any(verdict in ("A", "B") for verdict in verdicts), verdicts
    for judgement in judgements:
        assert math.isnan(judgement.probability) or judgement.probability in (0.0, 0.5, 1.0)
        assert (judgement.reason is None) != math.isnan(judgement.probability)
