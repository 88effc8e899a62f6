"""A reward that cannot score the selected tasks is refused before anything is generated or written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

from dialogsim.models import ModelNotCachedError
from dialogsim.rewards.factory import check_reward_scores
from envs.build import build_simulator
from refuel.config import RefuelConfig
from refuel.evaluation.evaluate import EvaluateConfig, evaluate
from refuel.plan import make_plan
from refuel.training.iterations import run

CHAT_ROWS = [
    {"id": f"chat-{i}", "task": "Chat", "dataset": "chat", "split": "train", "instruction": text}
    for i, text in enumerate(["Tell me about tea.", "How do I fold a paper crane?", "Name three rivers.", "Hi!"])
]


@pytest.fixture
def chat_prompts(tmp_path: Path) -> Path:
    """A prompt file of chat rows (task "Chat", no reference)."""
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in CHAT_ROWS))
    return path


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("math", r"--reward math scores only Math\* rows, not the selected task\(s\) Chat"),
        ("verifier", r"--reward verifier scores only Math\*, Coding, Logic rows, not the selected task\(s\) Chat"),
        ("none", r"--reward none scores no dialogue: it is for generating dialogues only"),
    ],
)
def test_train_refuses_a_reward_that_cannot_score_the_tasks(
    tmp_path: Path, tiny_model_path: str, chat_prompts: Path, reward: str, message: str
) -> None:
    """refuel-train on chat rows with --reward math / verifier / none stops before any file or generation, naming
    the tasks the reward scores and the --reward to use."""
    config = RefuelConfig(
        output_dir=str(tmp_path / "run"),
        policy_model=tiny_model_path,
        user_model=tiny_model_path,
        reward=reward,
        prompts=str(chat_prompts),
        tasks=["Chat"],
        datasets=["chat"],
        holdout=0,
        pairs_per_iteration=2,
        max_horizon=1,
        max_new_tokens=4,
        generation_batch_size=2,
    )
    with pytest.raises(ValueError, match=message) as error:
        run(config)
    assert "--reward <a sequence-classification reward model id or folder" in str(error.value)
    assert not (tmp_path / "run").exists()
    plan = make_plan(config)
    assert not plan.ok and [e for e in plan.errors if re.search(message, e)] == [str(error.value)]


def test_rows_of_an_unscorable_task_are_refused_before_the_user_model_loads(
    tiny_model_path: str, chat_prompts: Path
) -> None:
    """With every task of the file selected (tasks=None), the loaded rows' tasks are checked; "none" is fine for
    generation (the env, refuel-evaluate's dialogues)."""
    settings = {"prompts": chat_prompts, "tasks": None, "datasets": None, "splits": None}
    not_a_model = str(chat_prompts.parent)  # an existing folder passes the name check; loading it would fail
    with pytest.raises(ValueError, match="scores only Math"):
        build_simulator(**settings, policy_model=tiny_model_path, user_model=not_a_model, reward="math")
    simulator = build_simulator(**settings, policy_model=tiny_model_path, user_model=tiny_model_path, reward="none")
    assert {row.task for row in simulator.prompts.values()} == {"Chat"}


def test_evaluate_refuses_a_reward_judge_that_cannot_score_the_tasks(
    tmp_path: Path, tiny_model_path: str, chat_prompts: Path
) -> None:
    candidate = shutil.copytree(tiny_model_path, tmp_path / "candidate")
    config = EvaluateConfig(
        candidates=[str(candidate)],
        baseline=tiny_model_path,
        user_model=tiny_model_path,
        output_dir=str(tmp_path / "eval"),
        prompts=str(chat_prompts),
        tasks=["Chat"],
        datasets=["chat"],
        holdout=2,
        n_prompts=2,
        horizon=1,
        max_new_tokens=4,
        judge="reward",
        reward="code",
    )
    with pytest.raises(ValueError, match="--reward code scores only Coding rows"):
        evaluate(config)
    assert not (tmp_path / "eval").exists()  # nothing generated


def test_scorable_tasks_pass_and_the_fix_names_the_covering_rewards(monkeypatch: pytest.MonkeyPatch) -> None:
    check_reward_scores("verifier", ["Math_CoT", "Coding", "Logic"])
    with pytest.raises(ModelNotCachedError, match=r"reward='RLHFlow/ArmoRM-Llama3-8B-v0\.1': the hub is off"):
        check_reward_scores("RLHFlow/ArmoRM-Llama3-8B-v0.1", ["Chat"])  # offline and not in the local cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_reward_scores("RLHFlow/ArmoRM-Llama3-8B-v0.1", ["Chat"])  # online: a reward model scores every task
    check_reward_scores("none", ["Chat"], generation_only=True)
    with pytest.raises(ValueError, match="pass --reward verifier, or select"):
        check_reward_scores("math_format", ["Math_CoT", "Logic"])
