"""refuel.evaluation.analysis on hand-made pair rows, metrics, timings and judgements (numbers worked out by hand)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from refuel.evaluation.analysis import (
    AnalysisConfig,
    markdown,
    measured_speeds,
    pair_statistics,
    paired_difference,
    projected_minutes,
    prompts_to_resolve,
    summarize,
)
from refuel.evaluation.winrate import per_turn_win_rates
from refuel.storage import write_json, write_rows

# d = r − r' = 0.5 (h = H = 1), 0 (h = H = 2), −1 (h = 1 < H = 3), 0.5 (h = 2 < H = 3); the NaN pair is left out.
PAIRS = [
    {"reward": 1.0, "reward_prime": 0.5, "turn": 1, "horizon": 1},
    {"reward": 0.2, "reward_prime": 0.2, "turn": 2, "horizon": 2},
    {"reward": 0.0, "reward_prime": 1.0, "turn": 1, "horizon": 3},
    {"reward": 0.5, "reward_prime": 0.0, "turn": 2, "horizon": 3},
    {"reward": math.nan, "reward_prime": 0.3, "turn": 1, "horizon": 2},
]


def test_pair_statistics_by_hand() -> None:
    stats = pair_statistics(PAIRS)
    assert stats.pairs == 4
    assert stats.mean == pytest.approx(0.0)
    assert stats.variance == pytest.approx((0.25 + 0 + 1 + 0.25) / 3)  # ddof 1
    assert stats.std == pytest.approx(math.sqrt(0.5))
    assert stats.tie_share == pytest.approx(0.25)
    assert (stats.pairs_last_turn, stats.pairs_rollout) == (2, 2)
    assert stats.mean_abs_last_turn == pytest.approx(0.25)
    assert stats.mean_abs_rollout == pytest.approx(0.75)
    assert stats.mean_square_last_turn == pytest.approx(0.125)
    assert stats.mean_square_rollout == pytest.approx(0.625)
    assert stats.reply_share == pytest.approx(0.2)


def test_pair_statistics_without_rollout_pairs_and_bad_rows() -> None:
    stats = pair_statistics(PAIRS[:2])
    assert stats.pairs_rollout == 0 and math.isnan(stats.mean_abs_rollout) and math.isnan(stats.reply_share)
    with pytest.raises(ValueError, match="reward_prime"):
        pair_statistics([{"reward": 1.0, "turn": 1, "horizon": 1}])


def test_prompts_to_resolve_by_hand() -> None:
    judgements = pd.DataFrame(
        {
            "method": ["a"] * 8,
            "turn": [1] * 4 + [2] * 4,
            "outcome": [1, 1, 0, 1, 1, 0, 1, 0],
        }
    )
    table = prompts_to_resolve(judgements).set_index("turn")
    assert table.loc[1, "win_rate"] == pytest.approx(75.0)
    assert table.loc[1, "sd"] == pytest.approx(0.5)
    assert table.loc[1, "prompts_needed"] == math.ceil((1.959964 * 0.5 / 0.25) ** 2) == 16
    assert table.loc[2, "win_rate"] == pytest.approx(50.0) and math.isnan(table.loc[2, "prompts_needed"])


def test_paired_difference_by_hand() -> None:
    """A − B per turn, paired by prompt: the mean of per-prompt differences, a bootstrap interval around it, and the
    prompts a 95 % interval would need; prompts judged for one method only are left out."""
    prompts = [f"p{i}" for i in range(40)]
    a = [1.0] * 30 + [0.0] * 10  # turn 1: A wins 75 % of prompts
    b = [1.0] * 20 + [0.0] * 20  # B wins 50 %, on a subset of A's wins
    rows = [("A", p, 1, x) for p, x in zip(prompts, a, strict=True)]
    rows += [("B", p, 1, x) for p, x in zip(prompts, b, strict=True)]
    rows += [
        ("A", "p0", 2, 1.0),
        ("B", "p0", 2, 1.0),
        ("A", "p1", 2, 0.0),
        ("B", "p1", 2, 0.0),
        ("A", "only-a", 2, 1.0),
    ]
    judgements = pd.DataFrame(rows, columns=["method", "prompt_id", "turn", "outcome"])
    table = paired_difference(judgements, "A", "B").set_index("turn")
    first = table.loc[1]
    assert first["difference"] == pytest.approx(25.0) and first["prompts"] == 40
    assert 10 < first["ci_low"] < 25 < first["ci_high"] < 40  # d is 1 on 10 prompts, 0 on 30: sd 0.439
    sd = pd.Series([1.0] * 10 + [0.0] * 30).std(ddof=1)
    assert first["prompts_needed"] == math.ceil((1.959964 * sd / 0.25) ** 2)
    second = table.loc[2]  # identical outcomes on the two shared prompts: no spread, no interval, never resolved
    assert second["difference"] == 0 and second["prompts"] == 2
    assert math.isnan(second["ci_low"]) and math.isnan(second["prompts_needed"])
    with pytest.raises(ValueError, match=r"--contrast C: no such method in judgements.csv; its methods: \['A', 'B'\]"):
        paired_difference(judgements, "A", "C")


def _iteration(run: Path, method: str, collection: dict, started: float, trained: float) -> None:
    """A finished iteration_0 of ``method``: pairs, collection.json at ``started``, metrics.json at ``trained``."""
    folder = run / method / "iteration_0"
    write_json({"epochs": 2}, run / method / "config.json")
    write_rows(PAIRS, folder / "pairs.jsonl")
    (folder / "collection.json").write_text(json.dumps(collection))
    metrics = {
        "iteration": 0,
        "pairs": 4,
        "train_pairs": 3,
        "validation_pairs": 1,
        "dropped": collection["dropped"],
        "user_parse_rate": 0.5,
        "validation_before": {"loss": 2.0, "sign_agreement": 0.5},
        "validation_after": {"loss": 1.5, "sign_agreement": 0.75},
        "train_fit_after": {"loss": 1.0, "sign_agreement": 1.0},
    }
    write_json(metrics, folder / "metrics.json")
    os.utime(folder / "collection.json", (started, started))
    os.utime(folder / "metrics.json", (trained, trained))


def test_summary_speeds_and_projection(tmp_path: Path) -> None:
    collection = {"collection_seconds": 60.0, "dropped": {"identical_replies": 1}}
    _iteration(tmp_path, "refuel", collection, started=1000.0, trained=1120.0)  # 3 pairs × 2 epochs in 2 min
    _iteration(tmp_path, "dpo_lt", collection, started=2000.0, trained=2120.0)  # a copied collection: counted once
    (tmp_path / "timings.tsv").write_text("train-refuel\t300\tx\nevaluate\t120\tx\n")
    judgements = pd.DataFrame(
        {
            "method": ["a"] * 6,
            "prompt_id": ["p1", "p2", "p3"] * 2,
            "turn": [1, 1, 1, 2, 2, 2],
            "outcome": [1.0, 0.0, 0.5, 1.0, 1.0, 1.0],
        }
    )
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    judgements.to_csv(eval_dir / "judgements.csv", index=False)
    per_turn_win_rates(judgements).to_csv(eval_dir / "win_rates.csv", index=False)
    pd.DataFrame({"method": ["base", "base", "a", "a"], "turn": [1, 2, 1, 2], "dialogues": [10, 9, 10, 10]}).to_csv(
        eval_dir / "diagnostics.csv", index=False
    )

    speeds = measured_speeds(tmp_path, ["refuel", "dpo_lt"], dialogues=20)
    assert speeds.collection_pairs_per_minute == pytest.approx(5.0)  # (4 kept + 1 dropped) / 1 min, once
    assert speeds.training_pair_epochs_per_minute == pytest.approx(3.0)
    assert speeds.evaluation_dialogues_per_minute == pytest.approx(10.0)
    minutes = projected_minutes(speeds, pairs=50, pair_epochs=30, dialogues=100)
    assert minutes == pytest.approx({"collection": 10.0, "training": 10.0, "evaluation": 10.0, "total": 30.0})

    config = AnalysisConfig(run_dir=str(tmp_path), eval_dir=str(eval_dir), methods=["refuel", "dpo_lt"])
    summary = summarize(config)
    assert summary["every_interval_contains_50"] is False  # turn 2: three wins, interval collapsed at 100 %
    assert summary["speeds"]["evaluation_dialogues_per_minute"] == pytest.approx(10.0)  # 10 + 10 dialogues
    (refuel,) = summary["iterations"]["refuel"]
    assert refuel["validation_sign_agreement_after"] == 0.75
    assert refuel["difference_reply_share"] == pytest.approx(0.2)
    report = markdown(summary)
    assert "| method | h=1 | h=2 | avg |" in report and "0.750" in report
