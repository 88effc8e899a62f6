"""refuel-evaluate: cached generation, judging as a separate step, the reports (tiny random models, real prompts)."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest
from doubles import LengthReward

from dialogsim.backends.base import Completion
from dialogsim.judges import LLMJudge, RewardModelJudge
from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.sampling import SamplingParams
from refuel.config import RefuelConfig
from refuel.evaluation.diagnostics import DIAGNOSTIC_COLUMNS
from refuel.evaluation.evaluate import (
    EvaluateConfig,
    dialogue_cache,
    evaluate,
    evaluation_prompts,
    judge_dialogues,
    main,
)
from refuel.evaluation.report import write_html_report
from refuel.evaluation.winrate import count_table, judge_statistics, paper_table, per_turn_win_rates
from refuel.storage import write_json

HOLDOUT = 8
MAX_PROMPT_TOKENS = 100  # short GSM8K prompts keep the tiny-model dialogues fast


def messages(*replies: str, question: str = "q1") -> list[Message]:
    """A dialogue with a user question before each reply (the first question is ``question``)."""
    dialogue: list[Message] = []
    for index, reply in enumerate(replies):
        dialogue += [
            {"role": "user", "content": question if index == 0 else f"q{index + 1}"},
            {"role": "assistant", "content": reply},
        ]
    return dialogue


ROWS = {pid: PromptRow(id=pid, task="Math_CoT", dataset="gsm8k", instruction="q1") for pid in ("a", "b")}
DIALOGUES = {
    "base": {"a": messages("bb", "bbb"), "b": messages("bb", "bbb")},
    "long": {"a": messages("ccc", "c"), "b": messages("ccc")},  # b ended after turn 1
    "short": {"a": messages("c", "ccccc"), "b": messages("c", "c")},
}


class PreferLonger:
    """ChatBackend stub judge: the conversation whose text is longer wins (no position bias)."""

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        replies = []
        for conversation in conversations:
            text = conversation[-1]["content"]
            a, b = text.split("### Conversation A", 1)[1].split("### Conversation B", 1)
            b = b.split("First compare", 1)[0]
            verdict = "A" if len(a) > len(b) else "B"
            replies.append(Completion(f"Comparison: <b>{verdict}</b> is longer.\nBetter: {verdict}", (), (), "stop"))
        return replies


def test_judge_dialogues_pairs_every_candidate_prompt_and_turn() -> None:
    frame = judge_dialogues(RewardModelJudge(LengthReward()), DIALOGUES, "base", ROWS, horizon=2)
    assert list(frame.columns) == ["method", "prompt_id", "turn", "outcome", "reason", "score_first", "score_second"]
    assert len(frame) == 2 * 2 * 2  # candidates × prompts × turns
    outcome = frame.set_index(["method", "prompt_id", "turn"])["outcome"]
    assert outcome[("long", "a", 1)] == 1.0 and outcome[("long", "a", 2)] == 0.0
    assert math.isnan(outcome[("long", "b", 2)])
    assert outcome[("short", "a", 1)] == 0.0 and outcome[("short", "a", 2)] == 1.0
    assert frame.loc[frame["reason"].notna(), "reason"].tolist() == ["ended_before_turn"]


def test_llm_judged_frame_has_verdicts_and_comparisons() -> None:
    frame = judge_dialogues(LLMJudge(PreferLonger()), DIALOGUES, "base", ROWS, horizon=2)
    assert {"verdict_ab", "verdict_ba", "comparison_ab", "comparison_ba"} <= set(frame.columns)
    judged = frame.dropna(subset=["outcome"])
    assert set(judged["outcome"]) == {0.0, 1.0}  # a length-based judge is position-consistent (no ties here)
    stats = judge_statistics(frame).set_index("method")
    assert stats.loc["all", "position_bias_rate"] == 0.0 and stats.loc["all", "first_slot_rate"] == 50.0


def test_html_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    dialogues = {
        "base": {"a": messages("<script>alert(1)</script>", "fine"), "b": messages("bb", "bb")},
        "long": DIALOGUES["long"],
    }
    frame = judge_dialogues(LLMJudge(PreferLonger()), dialogues, "base", ROWS, horizon=2)
    rates = per_turn_win_rates(frame, n_resamples=100)
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    path = write_html_report(
        tmp_path / "report" / "report.html",
        title="long vs base <test>",
        settings={"judge": "llm-stub"},
        baseline="base",
        rates=paper_table(rates),
        counts=count_table(rates),
        judge_stats=judge_statistics(frame),
        judgements=frame,
        dialogues=dialogues,
        plot=png,
    )
    html = path.read_text()
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "long vs base &lt;test&gt;" in html
    assert "&lt;b&gt;" in html  # the judge's text is escaped too
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no external assets
    assert "data:image/png;base64," in html and "<style>" in html
    assert html.count('<details class="prompt">') == 2  # one per prompt of the one candidate
    assert "candidate shown as A" in html and "(the dialogue ended before this turn)" in html
    with pytest.raises(KeyError, match="no dialogue of method 'long' for prompt 'a'"):
        write_html_report(
            tmp_path / "x.html",
            title="t",
            settings={},
            baseline="base",
            rates=paper_table(rates),
            counts=count_table(rates),
            judge_stats=judge_statistics(frame),
            judgements=frame,
            dialogues={"base": dialogues["base"], "long": {}},
        )


def test_dialogue_cache_key_ignores_judging_settings(tmp_path: Path, tiny_model_path: str) -> None:
    config = EvaluateConfig(output_dir=str(tmp_path))
    path = dialogue_cache(config, tiny_model_path)
    rejudged = replace(
        config, judge="llm", judge_model="gpt-4o", reward="code", candidates=["x"], judge_template="letter"
    )
    assert dialogue_cache(rejudged, tiny_model_path) == path
    assert dialogue_cache(replace(config, temperature=0.5), tiny_model_path) != path
    assert dialogue_cache(config, "another-model") != path


@pytest.mark.slow
def test_evaluate_with_each_judge_reuses_the_dialogues(
    tmp_path: Path, tiny_model_path: str, shared_prompts: Path, one_torch_thread: None
) -> None:
    """Reward judge first (generates), then the LLM judge on the cached dialogues (regenerates nothing)."""
    candidate = tmp_path / "run" / "iteration_0" / "policy"
    candidate.parent.mkdir(parents=True)
    candidate.symlink_to(tiny_model_path)
    config = EvaluateConfig(
        candidates=[str(candidate)],
        baseline=tiny_model_path,
        user_model=tiny_model_path,
        output_dir=str(tmp_path / "eval"),
        prompts=str(shared_prompts),
        n_prompts=2,
        horizon=2,
        holdout=HOLDOUT,
        max_new_tokens=4,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        reward="math",
    )
    reward_paths = evaluate(config)
    cached = {path: path.stat().st_mtime_ns for path in (tmp_path / "eval" / "dialogues").iterdir()}
    assert len(cached) == 2  # baseline and candidate
    assert reward_paths["html"] == tmp_path / "eval" / "reward-math" / "report.html"
    judgements = pd.read_csv(reward_paths["judgements"])
    assert len(judgements) == 2 * 2 and set(judgements["method"]) == {"iteration_0"}

    llm_paths = evaluate(replace(config, judge="llm", judge_model=tiny_model_path, judge_max_new_tokens=4))
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "eval" / "dialogues").iterdir()} == cached
    assert llm_paths["html"].parent.name.startswith("llm-") and llm_paths["html"].parent.name.endswith("-compare")
    llm_judgements = pd.read_csv(llm_paths["judgements"])
    assert {"verdict_ab", "comparison_ba"} <= set(llm_judgements.columns)
    # a random tiny model rarely writes a verdict in 4 tokens: such pairs are invalid and counted, never guessed
    unparsable = llm_judgements["reason"] == "unparsable_verdict"
    assert llm_judgements.loc[unparsable, "outcome"].isna().all()
    stats = pd.read_csv(llm_paths["judge_stats"]).set_index("method")
    assert stats.loc["all", "pairs"] == 4 and stats.loc["all", "invalid"] == unparsable.sum()
    html = llm_paths["html"].read_text()
    assert html.count('<details class="prompt">') == 2
    for paths in (reward_paths, llm_paths):
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert list(pd.read_csv(paths["csv"], dtype={"turn": str})["turn"]) == ["1", "2", "avg"]
        # diagnostics of both policies' own dialogues at every turn, from the cached dialogues, whatever the judge
        assert paths["diagnostics"] == paths["html"].parent / "diagnostics.csv"
        diagnostics = pd.read_csv(paths["diagnostics"])
        assert tuple(diagnostics.columns) == DIAGNOSTIC_COLUMNS
        assert set(zip(diagnostics["method"], diagnostics["turn"], strict=True)) == {
            (method, turn) for method in ("iteration_0", Path(tiny_model_path).name) for turn in (1, 2)
        }
        assert (diagnostics["math_dialogues"] == diagnostics["dialogues"]).all()  # GSM8K rows: all Math_CoT
        assert diagnostics["accuracy"].between(0, 100).all() and diagnostics["reward_nan"].eq(0).all()
        assert diagnostics[["reward", "reply_tokens", "copy_rate", "format_rate"]].notna().all().all()
        assert diagnostics.loc[diagnostics["turn"] == 2, "fallback_rate"].isna().all()  # h = H: no user turn follows
        assert paths["diagnostics_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "Per-turn diagnostics" in paths["html"].read_text()
    assert diagnostics.loc[diagnostics["turn"] == 1, "dialogues"].tolist() == [2, 2]

    # a second candidate of the same folder name: the labels are disambiguated, the cache names are not, so the
    # policies evaluated before keep their dialogues (they were regenerated when the name depended on the set)
    other = tmp_path / "other" / "iteration_0" / "policy"
    shutil.copytree(Path(tiny_model_path).resolve(), other)
    evaluate(replace(config, candidates=[str(candidate), str(other)]))
    after = {path: path.stat().st_mtime_ns for path in (tmp_path / "eval" / "dialogues").iterdir()}
    assert {path: after[path] for path in cached} == cached and len(after) == 3


def five_row_test_file(path: Path, shared_raw: list[dict]) -> Path:
    """Five real rows: the shortest GSM8K (train), MATH (test) and MBPP (Coding) prompts, a second copy of the
    GSM8K one under another id (a duplicate) and the shortest HumanEval prompt (120 tokens: over a 100 budget)."""
    shortest = {
        dataset: min((row for row in shared_raw if row["dataset"] == dataset), key=lambda row: len(row["instruction"]))
        for dataset in ("gsm8k", "MATH", "mbpp", "humaneval")
    }
    rows = [shortest["gsm8k"], shortest["MATH"], shortest["mbpp"], {**shortest["gsm8k"], "id": "copy"}]
    rows.append(shortest["humaneval"])
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_all_rows_evaluates_every_row_of_a_file_with_labels_from_the_run(
    tmp_path: Path,
    tiny_model_path: str,
    shared_prompts: Path,
    one_torch_thread: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``refuel-evaluate --prompts <file> --all_rows --tasks all ...`` on a 5-row file: 3 rows pass the filters
    (two tasks, two splits), the 2 others are reported by reason; the candidate is labelled from its run."""
    raw = [json.loads(line) for line in shared_prompts.read_text(encoding="utf-8").splitlines()]
    test_file = five_row_test_file(tmp_path / "test.jsonl", raw)
    run = tmp_path / "run"
    write_json(asdict(RefuelConfig(output_dir=str(run), policy_model=tiny_model_path)), run / "config.json")
    candidate = run / "iteration_0" / "policy"
    candidate.parent.mkdir(parents=True)
    candidate.symlink_to(tiny_model_path)
    write_json({"iteration": 0}, run / "iteration_0" / "metrics.json")
    flags = ["--candidates", str(candidate), "--baseline", tiny_model_path, "--user_model", tiny_model_path]
    flags += ["--output_dir", str(tmp_path / "eval"), "--prompts", str(test_file), "--all_rows"]
    flags += ["--tasks", "all", "--datasets", "all", "--splits", "all", "--max_prompt_tokens", str(MAX_PROMPT_TOKENS)]
    main([*flags, "--horizon", "1", "--max_new_tokens", "4", "--reward", "verifier"])

    printed = capsys.readouterr().out
    assert (
        "prompts: all 3 rows that pass the filters (" + str(test_file) + ": kept 3 of 5 prompts (dropped: task 0, "
        "dataset 0, split 0, duplicate 1, over token budget 1, over limit 0))"
    ) in printed
    out = tmp_path / "eval" / "reward-verifier"
    judgements = pd.read_csv(out / "judgements.csv")
    assert set(judgements["method"]) == {"REFUEL π_1"}
    assert set(judgements["prompt_id"]) == {raw_row["id"] for raw_row in json_rows(test_file)[:3]}
    # the verifier scores the Coding row by running its tests (4-token replies pass none); `--reward math`, which
    # cannot score it, is refused before any generation (tests/test_reward_tasks.py)
    coding = judgements["prompt_id"] == json_rows(test_file)[2]["id"]
    assert (judgements.loc[coding, ["score_first", "score_second"]] == 0.0).all().all()
    assert list(pd.read_csv(out / "win_rates.csv")["method"].unique()) == ["REFUEL π_1"]
    assert set(pd.read_csv(out / "diagnostics.csv")["method"]) == {"π_0", "REFUEL π_1"}
    html = (out / "report.html").read_text()
    assert "win rate vs π_0" in html and "REFUEL π_1" in html and "duplicate 1, over token budget 1" in html


def json_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_all_rows_needs_a_prompt_file() -> None:
    with pytest.raises(ValueError, match="pass --prompts <your test file>"):
        evaluation_prompts(EvaluateConfig(all_rows=True))


def test_a_missing_candidate_is_refused_before_any_dialogue_is_generated(
    tmp_path: Path, tiny_model_path: str, shared_prompts: Path, one_torch_thread: None
) -> None:
    """A candidate folder that no run wrote: refused naming it, and the baseline's dialogues are not generated."""
    missing = tmp_path / "run" / "iteration_0" / "policy"
    config = EvaluateConfig(
        candidates=[str(missing)],
        baseline=tiny_model_path,
        user_model=tiny_model_path,
        output_dir=str(tmp_path / "eval"),
        prompts=str(shared_prompts),
        n_prompts=1,
        horizon=1,
        holdout=HOLDOUT,
        max_new_tokens=4,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )
    with pytest.raises(ValueError, match=f"candidates='{missing}': no such folder"):
        evaluate(config)
    assert not (tmp_path / "eval").exists()


def test_greedy_evaluation_is_valid_but_greedy_training_is_not() -> None:
    """Temperature 0 (greedy) is a valid evaluation; training takes log-probs at the temperature, so not there."""
    assert EvaluateConfig(temperature=0.0).temperature == 0.0
    with pytest.raises(ValueError, match=r"temperature=0\.0"):
        RefuelConfig(temperature=0.0)


@pytest.mark.parametrize(("field", "value"), [("horizon", 9), ("temperature", float("inf")), ("n_prompts", 0)])
def test_evaluate_settings_are_checked_like_the_training_ones(field: str, value: float) -> None:
    """The shared field check (dialogsim.settings: ranges on the fields) runs for refuel-evaluate too."""
    with pytest.raises(ValueError, match=f"{field}="):
        EvaluateConfig(**{field: value})
