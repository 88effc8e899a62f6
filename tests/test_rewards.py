"""Reward models: answer extraction and matching, MiniLM embeddings, the math reward, RM heads."""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from doubles import tiny_llama_config

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import RewardModel
from dialogsim.rewards.code_verifier import CodeTestReward, extract_code
from dialogsim.rewards.embedding import SentenceEmbedder
from dialogsim.rewards.factory import build_reward_model
from dialogsim.rewards.math_format import MathFormatReward, copy_rate, f_score, quantities
from dialogsim.rewards.math_reward import MathAnswerReward, reference_solution
from dialogsim.rewards.math_verifier import answers_match, extract_final_answer
from dialogsim.rewards.null import NoReward
from dialogsim.rewards.routed import TaskRoutedReward
from dialogsim.rewards.sandbox import SandboxLimits
from dialogsim.rewards.sequence_classification import SequenceClassificationReward, reward_values

ROWS_PER_DATASET = 30


def _rows(path: Path, dataset: str, count: int = ROWS_PER_DATASET) -> list[PromptRow]:
    rows: list[PromptRow] = []
    with path.open() as handle:
        for line in handle:
            record = json.loads(line)
            if record["dataset"] == dataset:
                fields = {key: record[key] for key in ("id", "task", "dataset", "instruction", "reference", "split")}
                rows.append(PromptRow(**fields, meta=record["meta"]))
            if len(rows) == count:
                break
    return rows


def _dialogue(*replies: str, question: str = "What is 6 times 3?") -> list[Message]:
    dialogue: list[Message] = []
    for index, reply in enumerate(replies):
        dialogue.append({"role": "user", "content": question if index == 0 else "Are you sure?"})
        dialogue.append({"role": "assistant", "content": reply})
    return dialogue


MATH_ROW = PromptRow(
    id="hand-1",
    task="Math_CoT",
    dataset="gsm8k",
    instruction="What is 6 times 3?",
    reference="18",
    meta={"source_solution": "6 times 3 is 6 + 6 + 6 = 18.\n#### 18"},
)


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder()


@pytest.fixture(scope="module")
def math_reward(embedder: SentenceEmbedder) -> MathAnswerReward:
    return MathAnswerReward(embedder=embedder)


# --- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("First \\boxed{3}, then \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{1}{\\sqrt{2}}"),
        ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("so the total is \\boxed 42.", "42"),
        ("\\fbox{7} is it", "7"),
        ("The final answer is: $\\frac12$.", "\\frac12"),
        ("The answer is 1,000 apples.", "1,000"),
        ("Answer: x + 1. Done.", "x + 1"),
        ("48/2 = <<48/2=24>>24\n#### 72", "72"),
        ("I found 3 apples and then 5.5 pears", "5.5"),
        ("an empty \\boxed{} does not count, 12 does", "12"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_extract_without_number_fallback_needs_an_explicit_answer() -> None:
    assert extract_final_answer("I computed 17 and 18", number_fallback=False) is None
    assert extract_final_answer("hence \\boxed{18}", number_fallback=False) == "18"


# --- matching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("1,000", "1000"),
        ("$18", "18"),
        ("\\$18", "18"),
        ("18.00", "18"),
        ("18 \\text{ dollars}", "18"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("\\frac{\\sqrt2}{2}", "\\frac{\\sqrt{2}}{2}"),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("1 + x", "x+1"),
        ("p-q", "p - q"),
    ],
)
def test_answers_match_equivalent(predicted: str, reference: str) -> None:
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [("17", "18"), ("-18", "18"), ("1,001", "1000"), ("\\frac{1}{3}", "0.5"), ("x - 1", "x+1"), ("", "18")],
)
def test_answers_match_different(predicted: str, reference: str) -> None:
    assert not answers_match(predicted, reference)


def test_answers_match_outside_the_main_thread() -> None:
    """math_verify's signal-based timeout cannot run in worker threads; matching must still work."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(answers_match, "\\frac{1}{2}", "0.5").result()
        assert not pool.submit(answers_match, "\\frac{1}{3}", "0.5").result()


@pytest.mark.parametrize("dataset", ["gsm8k", "MATH"])
def test_reference_solutions_verify_against_reference(shared_prompts: Path, dataset: str) -> None:
    rows = _rows(shared_prompts, dataset)
    assert len(rows) == ROWS_PER_DATASET
    for index, row in enumerate(rows):
        extracted = extract_final_answer(reference_solution(row))
        assert extracted is not None, row.id
        assert answers_match(extracted, row.reference), (row.id, extracted, row.reference)
        assert extract_final_answer(f"Step by step ... so \\boxed{{{extracted}}}.") == extracted
        wrong = rows[index - 1].reference  # another row's answer
        if not answers_match(wrong, row.reference):  # rare true duplicates are not a wrong answer
            assert not answers_match(extract_final_answer(f"so \\boxed{{{wrong}}}"), row.reference), (row.id, wrong)


def test_gsm8k_off_by_one_is_wrong(shared_prompts: Path) -> None:
    for row in _rows(shared_prompts, "gsm8k"):
        assert not answers_match(str(int(row.reference) + 1), row.reference)


# --- embeddings -------------------------------------------------------------------------------


def test_embeddings_are_unit_rows(embedder: SentenceEmbedder) -> None:
    vectors = embedder.encode(["The cat sat on the mat.", "word " * 600])  # second is truncated at 256 tokens
    assert vectors.shape == (2, 384)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))
    assert embedder.encode([]).shape == (0, 384)


def test_similarity_orders_paraphrase_above_unrelated(embedder: SentenceEmbedder) -> None:
    sentence = "The cat sat on the mat."
    identical, paraphrase, unrelated = embedder.similarity(
        [sentence] * 3, [sentence, "A cat was sitting on a mat.", "Stock markets fell sharply on Tuesday."]
    )
    assert identical == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > unrelated + 0.3
    with pytest.raises(ValueError, match="pass pairs"):
        embedder.similarity(["a"], [])


# --- math reward ------------------------------------------------------------------------------


def test_math_reward_prefers_the_correct_answer(math_reward: MathAnswerReward) -> None:
    correct = _dialogue("6 + 6 + 6 = 18, so the answer is \\boxed{18}.")
    wrong = _dialogue("6 + 6 + 6 = 19, so the answer is \\boxed{19}.")
    assert isinstance(math_reward, RewardModel)
    r_correct, r_wrong = math_reward.score([correct, wrong], [MATH_ROW, MATH_ROW])
    assert r_correct - r_wrong == pytest.approx(1.0, abs=0.1)  # same working, only the indicator differs
    assert -0.5 <= r_wrong < 0.5 < r_correct <= 1.5
    assert not math_reward.failures


def test_math_reward_reads_the_latest_stated_answer(math_reward: MathAnswerReward) -> None:
    corrected = _dialogue("The answer is \\boxed{19}.", "Sorry, I slipped: the answer is 18.")
    follow_up = _dialogue("The answer is \\boxed{18}.", "Because 3 groups of 6 make 6 + 6 + 6, step 2 gives 12.")
    assert math_reward.correct(corrected, MATH_ROW) is True
    assert math_reward.correct(follow_up, MATH_ROW) is True  # a later stray number does not replace the box
    assert math_reward.correct(_dialogue("I am not sure."), MATH_ROW) is False


def test_math_reward_failures_are_nan_and_counted(embedder: SentenceEmbedder) -> None:
    reward = MathAnswerReward(embedder=embedder)
    no_reference = PromptRow(id="x", task="Math_CoT", dataset="gsm8k", instruction="?", reference=None)
    coding = PromptRow(id="y", task="Coding", dataset="mbpp", instruction="?", reference="assert f() == 1")
    only_user: list[Message] = [{"role": "user", "content": "What is 6 times 3?"}]
    good = _dialogue("\\boxed{18}")
    scores = reward.score([good, good, only_user, good], [no_reference, coding, MATH_ROW, MATH_ROW])
    assert all(math.isnan(value) for value in scores[:3])
    assert scores[3] > 1.0
    assert reward.failures == {"no_reference": 1, "unsupported_task:Coding": 1, "no_assistant_reply": 1}
    assert reward.correct(only_user, MATH_ROW) is None
    with pytest.raises(ValueError, match="one row per dialogue"):
        reward.score([good], [])


def test_reference_solution_prefers_worked_solution() -> None:
    assert reference_solution(MATH_ROW) == MATH_ROW.meta["source_solution"]
    with_solution = PromptRow(
        id="z", task="Math_CoT", dataset="MATH", instruction="?", reference="2", meta={"solution": "1+1=2"}
    )
    assert reference_solution(with_solution) == "1+1=2"
    assert reference_solution(PromptRow(id="w", task="Math_CoT", dataset="MATH", instruction="?", reference="2")) == "2"


def test_factory() -> None:
    with pytest.raises(ValueError, match="empty reward spec"):
        build_reward_model("  ")
    assert isinstance(build_reward_model("math"), MathAnswerReward)
    assert isinstance(build_reward_model("Math_Format"), MathFormatReward)


# --- math_format reward ------------------------------------------------------------------------

CHANGE_PROBLEM = "A shop sells pens at $3 each. Ann buys 4 pens and pays with a $20 bill. How much change does she get?"
CHANGE_ROW = PromptRow(
    id="hand-2",
    task="Math_CoT",
    dataset="gsm8k",
    instruction="Solve the following math problem step-by-step.\nSimplify your answer as much as possible. Present "
    f"your final answer as \\boxed{{Your Answer}}.\n{CHANGE_PROBLEM}",
    reference="8",
    meta={"source_solution": "4 pens cost 4 * 3 = $<<4*3=12>>12.\nHer change is 20 - 12 = $<<20-12=8>>8.\n#### 8"},
)
ATTEMPT_WRONG = "First, the pens cost 4 * 3 = 12 dollars. Then 20 + 12 = 32, so her change is 32 dollars."
CORRECT_BOXED = "First, the pens cost 4 * 3 = 12 dollars. Then 20 - 12 = 8, so her change is \\boxed{8}."
CORRECT_UNBOXED = "First, the pens cost 4 * 3 = 12 dollars. Then 20 - 12 = 8, so her change is 8 dollars."
WRONG_BOXED = "First, the pens cost 4 * 3 = 12 dollars. Then 20 - 12 = 9, so her change is \\boxed{9}."


def _format_scores(replies: list[str], row: PromptRow = CHANGE_ROW) -> list[float]:
    reward = MathFormatReward()
    scores = reward.score([_dialogue(reply, question=row.instruction) for reply in replies], [row] * len(replies))
    assert not reward.failures
    return scores


def test_math_format_parts_read_quantities_format_and_copying() -> None:
    assert quantities("48/2 = 24, then 1,000 - 0.50 = $999.50") == {"48", "2", "24", "1000", "0.5", "999.5"}
    assert f_score({"12", "32"}, {"12", "8"}) == pytest.approx(0.5)
    assert f_score({"12"}, {"12", "8"}) == pytest.approx(1.25 * 0.5 / (0.25 + 0.5))  # precision weighs more
    assert f_score(set(), {"8"}) == f_score({"8"}, set()) == 0.0
    assert copy_rate(CHANGE_PROBLEM, CHANGE_ROW.instruction) == 1.0
    assert copy_rate("so her change is 8", CHANGE_ROW.instruction) == 0.0
    parts = MathFormatReward().parts(_dialogue(CORRECT_BOXED, question=CHANGE_ROW.instruction), CHANGE_ROW)
    assert parts == {"correct": 1.0, "boxed": 1.0, "working": 1.0, "copy": 0.0}


def test_math_format_ranks_non_attempts_below_a_genuine_attempt() -> None:
    attempt, restated, copied, empty, other_solution = _format_scores(
        [ATTEMPT_WRONG, CHANGE_PROBLEM, CHANGE_ROW.instruction, "", MATH_ROW.meta["source_solution"]]
    )
    assert attempt > 0.2  # the attempt computes the reference's 12, though its answer is wrong
    assert restated < 0 and copied < 0  # copying is charged; the prompt's \boxed{Your Answer} earns no format credit
    assert empty < attempt
    assert other_solution < attempt


def test_math_format_correct_boxed_above_correct_unboxed_above_wrong() -> None:
    boxed, unboxed, wrong_boxed, wrong_unboxed, bare_guess = _format_scores(
        [CORRECT_BOXED, CORRECT_UNBOXED, WRONG_BOXED, ATTEMPT_WRONG, "\\boxed{9}"]
    )
    assert boxed > unboxed > wrong_boxed > wrong_unboxed
    assert boxed - unboxed == pytest.approx(MathFormatReward().format_weight)
    assert bare_guess == 0.0  # a boxed guess without working or a correct answer earns no format credit
    assert _format_scores(["\\boxed{8}"])[0] > 1.0


@pytest.mark.parametrize("dataset", ["gsm8k", "MATH"])
def test_math_format_on_real_rows(shared_prompts: Path, dataset: str) -> None:
    """On real rows: restating scores below 0 and the reference solution above 1 on every row; on average the
    reference's first step (no final answer) beats an empty reply and another row's solution."""
    rows = _rows(shared_prompts, dataset)
    first_steps, others = [], []
    for index, row in enumerate(rows):
        solution = reference_solution(row)
        problem = row.instruction.split("\n", 2)[-1]
        first_step, restated, empty, other, full = _format_scores(
            [solution.split("\n")[0], problem, "", reference_solution(rows[index - 1]), solution], row
        )
        assert restated < 0 == empty < 1 < full, (row.id, restated, empty, full)
        first_steps.append(first_step)
        others.append(other)
    assert sum(first_steps) / len(rows) > sum(others) / len(rows) + 0.1


def test_math_format_failures_are_nan_and_counted() -> None:
    reward = MathFormatReward()
    no_reference = PromptRow(id="x", task="Math_CoT", dataset="gsm8k", instruction="?", reference=None)
    coding = PromptRow(id="y", task="Coding", dataset="mbpp", instruction="?", reference="assert f() == 1")
    only_user: list[Message] = [{"role": "user", "content": CHANGE_ROW.instruction}]
    good = _dialogue(CORRECT_BOXED)
    scores = reward.score([good, good, only_user, good], [no_reference, coding, CHANGE_ROW, CHANGE_ROW])
    assert all(math.isnan(value) for value in scores[:3])
    assert scores[3] > 1.0
    assert reward.failures == {"no_reference": 1, "unsupported_task:Coding": 1, "no_assistant_reply": 1}
    assert isinstance(reward, RewardModel)
    with pytest.raises(ValueError, match="one row per dialogue"):
        reward.score([good], [])


def test_math_format_reads_the_whole_dialogue() -> None:
    """Working counts over every reply; correctness and format follow the latest stated answer."""
    later_box = _dialogue(CORRECT_UNBOXED.replace("8 dollars", "the answer is 8"), "Yes: \\boxed{8}.")
    earlier_box = _dialogue(CORRECT_BOXED, "Sorry, the answer is 9.")
    boxed_later, corrected_away = MathFormatReward().score([later_box, earlier_box], [CHANGE_ROW] * 2)
    assert boxed_later > 1.5
    assert corrected_away < 1.0


# --- sequence-classification reward model -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reward_model_path(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init 2-layer LlamaForSequenceClassification (1 label) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = tiny_llama_config(tokenizer, num_labels=1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-reward-model")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_sequence_classification_reward_is_batch_invariant(tiny_reward_model_path: str) -> None:
    reward = SequenceClassificationReward(tiny_reward_model_path, batch_size=3)
    short = _dialogue("18.")
    long = _dialogue("Six times three: 6 + 6 + 6 = 18, so the answer is 18.", "Yes, I am sure it is 18.")
    medium = _dialogue("It is eighteen.")
    alone = reward.score([short], [MATH_ROW])
    mixed = reward.score([long, short, medium, short], [MATH_ROW] * 4)  # batches of 3 and 1, different padding
    assert all(math.isfinite(value) for value in mixed)
    assert mixed[1] == pytest.approx(alone[0], abs=1e-4)
    assert mixed[3] == pytest.approx(alone[0], abs=1e-4)
    assert mixed[0] != pytest.approx(mixed[1], abs=1e-6)  # the score depends on the dialogue
    assert not reward.failures


def test_sequence_classification_reward_marks_too_long(tiny_reward_model_path: str) -> None:
    reward = SequenceClassificationReward(tiny_reward_model_path)
    short = _dialogue("18.")
    ids = reward.tokenize(short)
    assert (
        ids == reward.tokenizer.apply_chat_template(short, tokenize=True)["input_ids"]
    )  # no special tokens added twice
    reward.max_length = len(ids)
    scores = reward.score([short, _dialogue("18. " * 50)], [MATH_ROW, MATH_ROW])
    assert math.isfinite(scores[0])
    assert math.isnan(scores[1])
    assert reward.failures == {"too_long": 1}


def test_padding_never_uses_an_id_inside_the_batch(tiny_reward_model_path: str) -> None:
    reward = SequenceClassificationReward(tiny_reward_model_path)
    ids = [reward.tokenize(_dialogue("18.")), reward.tokenize(_dialogue("It is 18.", "Yes."))]
    assert reward.preferred_pad_ids[0] in ids[0]  # SmolLM2: pad = EOS = <|im_end|>, which ends every message
    pad = reward.padding_id(ids)
    assert all(pad not in sequence for sequence in ids)
    assert reward.model.config.pad_token_id == reward.preferred_pad_ids[0]  # restored after each forward
    reward.score([_dialogue("18.")], [MATH_ROW])
    assert reward.model.config.pad_token_id == reward.preferred_pad_ids[0]


# --- reward heads with custom code (ArmoRM style) ---------------------------------------------------

GATED_HEAD_MODULE = "modeling_tiny_gated"
GATED_HEAD_CODE = '''
"""A tiny ArmoRM-style reward model: several objectives mixed into `score`, no `logits`, first-pad pooling."""
from dataclasses import dataclass

import torch
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class GatedRewardOutput(ModelOutput):
    score: torch.FloatTensor | None = None
    rewards: torch.FloatTensor | None = None


class TinyGatedRewardModel(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, 3, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        rewards = self.regression_layer(hidden[torch.arange(input_ids.shape[0]), last])  # [B, 3]
        return GatedRewardOutput(score=rewards.mean(dim=1), rewards=rewards)  # score: [B]
'''


@pytest.fixture(scope="module")
def gated_reward_model_path(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init custom-code reward model whose config maps AutoModelForSequenceClassification to it."""
    import importlib.util

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-gated-reward-model")
    (folder / f"{GATED_HEAD_MODULE}.py").write_text(GATED_HEAD_CODE)
    spec = importlib.util.spec_from_file_location(GATED_HEAD_MODULE, folder / f"{GATED_HEAD_MODULE}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = tiny_llama_config(tokenizer)  # pad = EOS = <|im_end|>, as when a pad token is missing
    config.auto_map = {"AutoModelForSequenceClassification": f"{GATED_HEAD_MODULE}.TinyGatedRewardModel"}
    torch.manual_seed(0)
    module.TinyGatedRewardModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_custom_head_needs_trust_remote_code(gated_reward_model_path: str) -> None:
    with pytest.raises(ValueError, match="trust_remote_code"):
        SequenceClassificationReward(gated_reward_model_path)


def test_custom_head_score_output_and_first_pad_pooling(gated_reward_model_path: str) -> None:
    """`.score` is read; padding with an id absent from the dialogues keeps first-pad pooling on the last token."""
    reward = SequenceClassificationReward(gated_reward_model_path, trust_remote_code=True, batch_size=4)
    assert type(reward.model).__name__ == "TinyGatedRewardModel"
    one = _dialogue("18.", "Yes, 18.")
    other = _dialogue("18.", "No, it is 19 because I added wrong.")  # same first message, different end
    alone = [reward.score([d], [MATH_ROW])[0] for d in (one, other)]
    batched = reward.score([one, other, _dialogue("18.")], [MATH_ROW] * 3)
    assert batched[:2] == pytest.approx(alone, abs=1e-4)
    assert alone[0] != pytest.approx(alone[1], abs=1e-6)  # pooled at the end, not after the first message


def test_reward_values_reads_score_logits_or_tuples() -> None:
    logits = torch.tensor([[1.0, 9.0], [2.0, 9.0]])
    assert reward_values(SimpleNamespace(logits=logits)).tolist() == [1.0, 2.0]
    assert reward_values(SimpleNamespace(score=torch.tensor([0.3, 0.4]), logits=logits)).tolist() == pytest.approx(
        [0.3, 0.4]
    )
    assert reward_values(SimpleNamespace(score=None, logits=logits)).tolist() == [1.0, 2.0]
    assert reward_values((torch.tensor([[5.0], [6.0]]),)).tolist() == [5.0, 6.0]
    with pytest.raises(TypeError, match="without a 'score' or 'logits' tensor"):
        reward_values({"rewards": torch.zeros(2)})


# --- code verifier ------------------------------------------------------------------------------------

CODE_ROWS_PER_DATASET = 3
MBPP_REFERENCE_ROWS = 20  # reference solutions that must pass in the sandbox (and wrong ones fail)


def _code_rows(path: Path) -> list[PromptRow]:
    return _rows(path, "humaneval", CODE_ROWS_PER_DATASET) + _rows(path, "mbpp", CODE_ROWS_PER_DATASET)


def _reply_with(code: str, prose: str = "Here is my solution:") -> str:
    return f"{prose}\n```python\n{code}\n```\nIt handles the examples."


def _canonical(row: PromptRow) -> str:
    """The dataset's own solution as a model would write it (HumanEval: prompt + body, imports left out)."""
    if row.dataset == "humaneval":
        lines = row.meta["prompt"].splitlines(keepends=True)
        return (
            "".join(line for line in lines if not line.startswith(("from", "import"))) + row.meta["canonical_solution"]
        )
    return row.meta["canonical_solution"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
        ("```py\nx = 1\n```\nand\n```\ny = 2\n```", "y = 2\n"),
        ("```python\ndef f():\n    return 1\n```\nUsage:\n```python\nprint(f())\n```", "def f():\n    return 1\n"),
        ("```bash\npip install x\n```", None),
        ("no code at all", None),
        ("```python\ndef f():\n    return 1", "def f():\n    return 1\n"),  # cut at the token cap
    ],
)
def test_extract_code(reply: str, expected: str | None) -> None:
    assert extract_code(reply, entry_point="f") == expected


def test_code_reward_passes_reference_solutions_and_fails_wrong_ones(shared_prompts: Path) -> None:
    rows = _rows(shared_prompts, "humaneval", CODE_ROWS_PER_DATASET) + _rows(
        shared_prompts, "mbpp", MBPP_REFERENCE_ROWS
    )
    reward = CodeTestReward()
    assert isinstance(reward, RewardModel)
    right = [_dialogue(_reply_with(_canonical(row)), question=row.instruction) for row in rows]
    wrong = [
        _dialogue(_reply_with(f"def {row.meta['entry_point']}(*args):\n    return None"), question=row.instruction)
        for row in rows
    ]
    assert reward.score(right + wrong, rows + rows) == [1.0] * len(rows) + [0.0] * len(rows)
    assert reward.outcomes == {"passed": len(rows), "failed": len(rows)}
    assert not reward.failures


def test_code_reward_uses_the_latest_code_and_counts_outcomes(shared_prompts: Path) -> None:
    row = _code_rows(shared_prompts)[-1]  # an MBPP row
    name = row.meta["entry_point"]
    reward = CodeTestReward(limits=SandboxLimits(timeout_seconds=3.0))
    dialogues = [
        _dialogue(_reply_with(_canonical(row)), "It loops over the input once.", question=row.instruction),
        _dialogue("I would use a loop.", question=row.instruction),
        _dialogue(_reply_with(f"import sys\nsys.exit(0)\n{_canonical(row)}"), question=row.instruction),
        _dialogue(_reply_with(f"def {name}(*args):\n    while True:\n        pass"), question=row.instruction),
        _dialogue(
            _reply_with(f"import socket\nsocket.create_connection(('1.1.1.1', 80))\n{_canonical(row)}"),
            question=row.instruction,
        ),
    ]
    assert reward.score(dialogues, [row] * len(dialogues)) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert reward.outcomes == {"passed": 1, "no_code": 1, "failed": 1, "timeout": 1, "blocked": 1}


def test_code_reward_neither_logs_nor_excuses_what_a_program_prints(
    shared_prompts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A program that prints the sandbox's old setup-failure line and exits 121 scores 0, and nothing is logged."""
    row = _code_rows(shared_prompts)[-1]
    secret = f"hf_{secrets.token_hex(16)}"
    forged = f"import sys\nprint('dialogsim-sandbox-setup-failed: {secret}', file=sys.stderr)\nsys.exit(121)"
    reward = CodeTestReward()
    with caplog.at_level(logging.DEBUG):
        assert reward.score([_dialogue(_reply_with(forged), question=row.instruction)], [row]) == [0.0]
    assert reward.outcomes == {"failed": 1} and not reward.failures
    assert secret not in caplog.text


def test_code_reward_nan_reasons(shared_prompts: Path) -> None:
    coding = _code_rows(shared_prompts)[0]
    no_reference = PromptRow(id="n", task="Coding", dataset="mbpp", instruction="?", reference=None)
    reward = CodeTestReward()
    only_user: list[Message] = [{"role": "user", "content": coding.instruction}]
    scores = reward.score([_dialogue("```python\nx=1\n```")] * 2 + [only_user], [MATH_ROW, no_reference, coding])
    assert all(math.isnan(score) for score in scores)
    assert reward.failures == {"unsupported_task:Math_CoT": 1, "no_reference": 1, "no_assistant_reply": 1}


# --- routing by task, no reward, the factory ----------------------------------------------------------


def test_task_routed_reward_sends_rows_by_task(shared_prompts: Path, math_reward: MathAnswerReward) -> None:
    coding = _code_rows(shared_prompts)[0]
    logic = PromptRow(id="l", task="Logic", dataset="hotpotqa", instruction="Who?", reference="Ed Wood")
    routed = TaskRoutedReward({"Math": math_reward, "Coding": CodeTestReward()})
    assert isinstance(routed, RewardModel)
    math_failures = dict(math_reward.failures)
    scores = routed.score(
        [_dialogue("\\boxed{18}"), _dialogue(_reply_with(_canonical(coding))), _dialogue("Ed Wood")],
        [MATH_ROW, coding, logic],
    )
    assert scores[0] > 1.0 and scores[1] == 1.0 and math.isnan(scores[2])
    assert routed.failures - Counter(math_failures) == Counter({"unsupported_task:Logic": 1})
    with pytest.raises(ValueError, match="at least one route"):
        TaskRoutedReward({})


def test_factory_builds_every_builtin_spec() -> None:
    assert isinstance(build_reward_model("code"), CodeTestReward)
    verifier = build_reward_model("verifier")
    assert isinstance(verifier, TaskRoutedReward) and set(verifier.routes) == {"Math", "Coding", "Logic"}
    none = build_reward_model("none")
    assert isinstance(none, NoReward)
    assert all(math.isnan(value) for value in none.score([_dialogue("18")], [MATH_ROW]))
    assert none.failures == {"no_reward": 1}
