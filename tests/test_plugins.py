"""Rewards and judges from the user's own code (dialogsim.plugins): ``--reward package.module:name``, installed
entry points, the early task check, NaN with a reason for a failing function, and the README's example.

The entry-point tests build a real distribution on disk (``<name>.dist-info`` with ``entry_points.txt``) and put its
folder on the path, so :func:`importlib.metadata.entry_points` finds it exactly as it finds an installed package.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sysconfig
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from dialogsim.console import UsageError
from dialogsim.judges.base import JudgePair
from dialogsim.judges.factory import build_judge
from dialogsim.judges.function import FunctionJudge
from dialogsim.messages import Message
from dialogsim.plugins import REWARD_GROUP, find_plugin
from dialogsim.prompts import PromptRow
from dialogsim.rewards.factory import build_reward_model, check_reward_scores
from dialogsim.rewards.function import FunctionReward
from refuel.training.iterations import main as train_main

REPO = Path(__file__).resolve().parents[1]
MODULE = Path(__file__).stem  # this test module, importable by name (pytest puts tests/ on sys.path)
ROW = PromptRow(id="r1", task="Math_CoT", dataset="gsm8k", split="train", instruction="2 + 2?", reference="4")


def _dialogue(reply: str) -> list[Message]:
    return [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": reply}]


# Rewards of a user's module, in every form a plugin may take.
def words(dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
    """A plain scoring function: words in the last reply."""
    return [float(len(dialogue[-1]["content"].split())) for dialogue in dialogues]


words.scored_tasks = ("Math",)  # type: ignore[attr-defined]


class WordReward:
    """A RewardModel class (instantiated without arguments)."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        return words(dialogues, rows)


def make_word_reward() -> WordReward:
    """A factory without arguments."""
    return WordReward()


word_reward = WordReward()  # an instance


def broken(dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
    raise KeyError("reference")


def not_a_reward() -> str:
    return "a string"


def longer(pairs: list[JudgePair]) -> list[float]:
    """A plain judging function: the dialogue with the longer turn-h reply wins, equal lengths tie."""
    lengths = [[len(dialogue[-1]["content"]) for dialogue in pair.truncated()] for pair in pairs]  # type: ignore[union-attr]
    return [0.5 if first == second else float(first > second) for first, second in lengths]


@pytest.mark.parametrize("name", ["words", "WordReward", "make_word_reward", "word_reward"])
def test_a_function_class_factory_or_instance_is_a_reward(name: str) -> None:
    reward = build_reward_model(f"{MODULE}:{name}")
    assert reward.score([_dialogue("four, it is"), _dialogue("4")], [ROW, ROW]) == [3.0, 1.0]
    assert isinstance(reward, FunctionReward) == (name == "words")


def test_a_failing_function_gives_nan_with_a_counted_reason() -> None:
    """Raising, a wrong length and non-numbers never crash the run and never become 0."""
    reward = build_reward_model(f"{MODULE}:broken")
    assert all(math.isnan(score) for score in reward.score([_dialogue("4")] * 2, [ROW, ROW]))
    assert reward.failures == Counter({"function_error:KeyError": 2})
    odd = FunctionReward(lambda dialogues, rows: [1.0, "2", None, math.inf, True][: len(dialogues)], "odd")
    scores = odd.score([_dialogue("4")] * 5, [ROW] * 5)
    assert scores[0] == 1.0 and all(math.isnan(score) for score in scores[1:])
    assert odd.failures == Counter({"function_not_a_number": 4})
    short = FunctionReward(lambda dialogues, rows: [1.0], "short")
    assert all(math.isnan(score) for score in short.score([_dialogue("4")] * 2, [ROW, ROW]))
    assert short.failures == Counter({"function_wrong_length": 2})


def test_the_early_task_check_asks_the_plugin() -> None:
    """scored_tasks on the function: Chat rows are refused before anything is built; no attribute: every task."""
    check_reward_scores(f"{MODULE}:words", ["Math_CoT"])
    with pytest.raises(UsageError, match=rf"--reward {MODULE}:words scores only Math\* rows, not .* Chat"):
        check_reward_scores(f"{MODULE}:words", ["Math_CoT", "Chat"])
    check_reward_scores(f"{MODULE}:WordReward", ["Chat", "Coding"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_28:score", r"--reward no_such_module_28:score: cannot load it \(ModuleNotFoundError"),
        (f"{MODULE}:no_such_name", rf"--reward {MODULE}:no_such_name: cannot load it \(AttributeError"),
        (f"{MODULE}:not_a_reward", r"str is not a RewardModel \(it needs failures, score\)"),
    ],
)
def test_a_plugin_that_cannot_be_a_reward_is_refused(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_reward_model(spec)


def test_a_judge_of_the_users_code() -> None:
    """--judge module:function: P(first better) per pair; pairs ending before turn h are NaN without a call."""
    judge = build_judge(f"{MODULE}:longer")
    assert isinstance(judge, FunctionJudge) and judge.name == f"plugin-{MODULE}_longer"
    long_, short = _dialogue("four, it is"), _dialogue("4")
    judgements = judge.judge([JudgePair(long_, short, 1, ROW), JudgePair(short, long_, 1, ROW)])
    assert [j.probability for j in judgements] == [1.0, 0.0]
    ended = judge.judge([JudgePair(long_, short, 2, ROW)])
    assert math.isnan(ended[0].probability) and ended[0].reason == "ended_before_turn"
    failing = FunctionJudge(lambda pairs: [2.0] * len(pairs), "bad")
    assert failing.judge([JudgePair(long_, short, 1, ROW)])[0].reason == "function_not_a_probability"
    with pytest.raises(UsageError, match=r"--judge nonsense: unknown judge; choose one of reward, llm"):
        build_judge("nonsense")


def _distribution(site: Path, module: str, source: str, group: str, entry: str) -> None:
    """A module and its ``.dist-info`` (METADATA and entry_points.txt) in ``site``: an installed package."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")


PLUGIN_SOURCE = '''
def reply_length(dialogues, rows):
    """Characters of the last reply, in hundreds."""
    return [len(dialogue[-1]["content"]) / 100 for dialogue in dialogues]
'''


def test_an_installed_entry_point_is_found_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _distribution(
        tmp_path / "site", "tiny_rewards_28", PLUGIN_SOURCE, REWARD_GROUP, "reply_length = tiny_rewards_28:reply_length"
    )
    assert find_plugin("reply_length", REWARD_GROUP, "--reward") is None  # not installed yet
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    reward = build_reward_model("reply_length")
    assert reward.score([_dialogue("x" * 250)], [ROW]) == [2.5]
    assert build_reward_model("math").__class__.__name__ == "MathAnswerReward"  # a built-in name is never a plugin


def _readme_example() -> str:
    """The first Python block of the README section "Your own reward"."""
    section = (REPO / "README.md").read_text().split("\n## Your own reward\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)  # type: ignore[union-attr]


def _env(*paths: Path) -> dict[str, str]:
    path = os.pathsep.join([*(str(p) for p in paths), str(REPO), os.environ.get("PYTHONPATH", "")])
    return os.environ | {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_the_readme_example_scores_and_is_checked_against_the_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's my_rewards.py, as a user saves it: it scores, and its scored_tasks refuse Chat rows."""
    (tmp_path / "my_rewards.py").write_text(_readme_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward_model("my_rewards:brevity")
    assert reward.score([_dialogue("it is four"), _dialogue("4")], [ROW, ROW]) == [-0.03, -0.01]
    check_reward_scores("my_rewards:brevity", ["Math_CoT"])
    with pytest.raises(UsageError, match=r"--reward my_rewards:brevity scores only Math\* rows"):
        check_reward_scores("my_rewards:brevity", ["Chat"])


@pytest.mark.slow
def test_the_readme_example_passes_the_dry_run(tmp_path: Path) -> None:
    """refuel-plan (a subprocess, as the README's command runs) takes `--reward my_rewards:brevity` for Math rows
    (exit 0) and refuses it for Chat rows (exit 2), without a traceback."""
    (tmp_path / "my_rewards.py").write_text(_readme_example())
    plan = [str(Path(sysconfig.get_path("scripts")) / "refuel-plan"), "--config", "configs/cpu_main.yaml"]
    plan += ["--reward", "my_rewards:brevity", "--output_dir", str(tmp_path / "run")]
    run = subprocess.run(plan, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert "reward         my_rewards:brevity [your own reward (plugin)]" in run.stdout
    chat = subprocess.run(
        [*plan, "--tasks", "Chat"], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert chat.returncode == 2 and "Traceback" not in chat.stderr
    assert "error: the configuration does not validate: --reward my_rewards:brevity scores only Math*" in chat.stderr


def _tiny_run_flags(output_dir: Path, tiny_model_path: str, shared_prompts: Path) -> list[str]:
    """One tiny iteration of the tiny model (as tests/test_run_folder.py runs it)."""
    return [
        "--output_dir", str(output_dir),
        "--policy_model", tiny_model_path,
        "--user_model", tiny_model_path,
        "--prompts", str(shared_prompts),
        "--holdout", "0",
        "--pairs_per_iteration", "4",
        "--generation_batch_size", "4",
        "--max_horizon", "1",
        "--max_new_tokens", "8",
        "--max_prompt_tokens", "100",
        "--per_device_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--validation_fraction", "0.25",
    ]  # fmt: skip


def _check_rewards(output_dir: Path, expected: Callable[[list[Message]], float]) -> None:
    """The iteration finished and every kept pair's rewards are the plugin's scores of its two dialogues."""
    assert (output_dir / "iteration_0" / "metrics.json").is_file()
    rows = [json.loads(line) for line in (output_dir / "iteration_0" / "pairs.jsonl").read_text().splitlines()]
    assert rows, "no pair kept"
    for row in rows:
        assert row["reward"] == pytest.approx(expected(row["dialogue"]))
        assert row["reward_prime"] == pytest.approx(expected(row["dialogue_prime"]))


@pytest.mark.slow
def test_refuel_train_with_a_reward_class_from_a_test_module(
    tmp_path: Path, tiny_model_path: str, shared_prompts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`refuel-train --reward test_plugins:WordReward`: one tiny iteration end to end, scored by the class."""
    output_dir = tmp_path / "run"
    train_main([*_tiny_run_flags(output_dir, tiny_model_path, shared_prompts), "--reward", f"{MODULE}:WordReward"])
    assert "final policy:" in capsys.readouterr().out
    _check_rewards(output_dir, lambda dialogue: len(dialogue[-1]["content"].split()))


@pytest.mark.slow
def test_refuel_train_with_a_reward_installed_as_an_entry_point(
    tmp_path: Path, tiny_model_path: str, shared_prompts: Path
) -> None:
    """A package registering `reply_length` under dialogsim.rewards; the real refuel-train finds it by name."""
    site = tmp_path / "site"
    _distribution(site, "tiny_rewards_28", PLUGIN_SOURCE, REWARD_GROUP, "reply_length = tiny_rewards_28:reply_length")
    output_dir = tmp_path / "run"
    command = [str(Path(sysconfig.get_path("scripts")) / "refuel-train")]
    command += [*_tiny_run_flags(output_dir, tiny_model_path, shared_prompts), "--reward", "reply_length"]
    result = subprocess.run(command, env=_env(site), capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_rewards(output_dir, lambda dialogue: len(dialogue[-1]["content"]) / 100)
