"""Per-turn win rates: outcomes, bootstrap intervals, the paper table and the saved report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from refuel.evaluation.winrate import (
    RATE_COLUMNS,
    count_table,
    judge_statistics,
    paper_table,
    per_turn_win_rates,
    save_report,
)


def judgements(outcomes_by_turn: dict[int, list[float]], method: str = "refuel") -> pd.DataFrame:
    """Long judgements frame: prompt ``p{i}`` at turn h has ``outcomes_by_turn[h][i]``."""
    rows = [
        {"method": method, "prompt_id": f"p{i}", "turn": turn, "outcome": outcome}
        for turn, outcomes in outcomes_by_turn.items()
        for i, outcome in enumerate(outcomes)
    ]
    return pd.DataFrame(rows)


def row(rates: pd.DataFrame, method: str, turn: str) -> pd.Series:
    return rates[(rates["method"] == method) & (rates["turn"] == turn)].squeeze()


def test_two_prompts_one_win_one_loss_has_the_exact_full_interval() -> None:
    """Known case: resampled means of 2 prompts are 0, ½, 1 with probability ¼, ½, ¼: the 95 % interval is [0, 100]."""
    rates = per_turn_win_rates(judgements({1: [1.0, 0.0]}), n_resamples=4000, seed=1)
    turn_1 = row(rates, "refuel", "1")
    assert (turn_1["win_rate"], turn_1["ci_low"], turn_1["ci_high"]) == (50.0, 0.0, 100.0)


def test_seven_wins_three_losses_matches_manual_percentile_bootstrap() -> None:
    outcomes = [1.0] * 7 + [0.0] * 3
    rates = per_turn_win_rates(judgements({1: outcomes}), n_resamples=4000, seed=3)
    turn_1 = row(rates, "refuel", "1")
    assert turn_1["win_rate"] == pytest.approx(70.0)
    assert 30.0 <= turn_1["ci_low"] <= 70.0 <= turn_1["ci_high"] <= 100.0
    assert (turn_1["n"], turn_1["ties"], turn_1["invalid"]) == (10, 0, 0)

    resampled = np.random.default_rng(123).choice(outcomes, size=(20_000, len(outcomes)))
    manual_low, manual_high = 100 * np.percentile(resampled.mean(axis=1), [2.5, 97.5])
    assert turn_1["ci_low"] == pytest.approx(manual_low, abs=5.0)
    assert turn_1["ci_high"] == pytest.approx(manual_high, abs=5.0)


def test_all_ties_collapse_interval_and_single_prompt_has_nan_bounds() -> None:
    rates = per_turn_win_rates(judgements({1: [0.5] * 6, 2: [0.5] + [math.nan] * 5}), n_resamples=200)
    ties = row(rates, "refuel", "1")
    assert (ties["win_rate"], ties["ci_low"], ties["ci_high"], ties["ties"]) == (50.0, 50.0, 50.0, 6)
    single = row(rates, "refuel", "2")
    assert single["win_rate"] == 50.0 and single["n"] == 1
    assert math.isnan(single["ci_low"]) and math.isnan(single["ci_high"])


def test_nan_outcomes_are_invalid_and_excluded() -> None:
    rates = per_turn_win_rates(judgements({1: [1.0, 0.0, 0.5, math.nan, math.nan]}), n_resamples=200)
    turn_1 = row(rates, "refuel", "1")
    assert turn_1["win_rate"] == pytest.approx(50.0)
    assert (turn_1["n"], turn_1["ties"], turn_1["invalid"]) == (3, 1, 2)


def test_turn_without_judged_prompts_is_nan_and_sparse_turns_keep_a_finite_avg_interval() -> None:
    rates = per_turn_win_rates(judgements({1: [1, 0, 1, 1, 0, 1], 2: [1] + [math.nan] * 5}), n_resamples=300)
    avg = row(rates, "refuel", "avg")
    assert avg["win_rate"] == pytest.approx((100 * 4 / 6 + 100) / 2)
    assert avg["ci_low"] <= avg["win_rate"] <= avg["ci_high"]
    all_invalid = per_turn_win_rates(judgements({1: [1, 0, 1], 2: [math.nan] * 3}), n_resamples=300)
    assert (row(all_invalid, "refuel", "2")[["n", "invalid"]] == [0, 3]).all()
    assert row(all_invalid, "refuel", "2")[["win_rate", "ci_low", "ci_high"]].isna().all()
    assert row(all_invalid, "refuel", "avg")[["win_rate", "ci_low", "ci_high"]].isna().all()


def test_avg_row_is_mean_of_turns_with_totals() -> None:
    frame = pd.concat(
        [
            judgements({1: [1, 1, 0, 0], 2: [1, 1, 1, 0], 3: [1, 0.5, 1, math.nan]}, "refuel"),
            judgements({1: [0, 0, 1, 0], 2: [0, 1, 0, 0], 3: [0.5, 0.5, 0, 0]}, "dpo-lt"),
        ]
    )
    rates = per_turn_win_rates(frame, n_resamples=300)
    assert list(rates.columns) == list(RATE_COLUMNS)
    assert list(rates["turn"]) == ["1", "2", "3", "avg"] * 2
    for method in ("refuel", "dpo-lt"):
        of_method = rates[rates["method"] == method]
        avg = row(rates, method, "avg")
        assert avg["win_rate"] == pytest.approx(of_method.loc[of_method["turn"] != "avg", "win_rate"].mean())
        assert avg["ci_low"] <= avg["win_rate"] <= avg["ci_high"]
    refuel_avg = row(rates, "refuel", "avg")
    assert refuel_avg["win_rate"] == pytest.approx((50 + 75 + 250 / 3) / 3)
    assert (refuel_avg["n"], refuel_avg["ties"], refuel_avg["invalid"]) == (11, 1, 1)


def test_intervals_are_reproducible_from_the_seed() -> None:
    frame = judgements({1: [1, 0, 1, 1, 0, 1], 2: [0, 0, 1, 1, 0.5, 1]})
    first = per_turn_win_rates(frame, n_resamples=300, seed=7)
    pd.testing.assert_frame_equal(first, per_turn_win_rates(frame, n_resamples=300, seed=7))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"method": ["a"], "turn": [1]}), r"missing columns \['prompt_id', 'outcome'\]; got columns"),
        (judgements({0: [1.0, 0.0]}), "integers >= 1"),
        (judgements({1: [1.0, 1.7]}), r"must be a probability in \[0, 1\] or NaN"),
        (judgements({1: [-0.1]}), "must be a probability"),
        (pd.concat([judgements({1: [1.0]}), judgements({1: [0.0]})]), "repeated"),
    ],
)
def test_bad_judgements_are_rejected(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        per_turn_win_rates(frame)


def test_paper_table_layout() -> None:
    frame = pd.concat(
        [judgements({1: [1, 0, 1], 2: [1, 1, 0]}, "refuel"), judgements({1: [0, 0, 1], 2: [0.5, 1, 0]}, "rebel-lt")]
    )
    table = paper_table(per_turn_win_rates(frame, n_resamples=200))
    assert table.shape == (2, 3)
    assert list(table.columns) == ["h=1", "h=2", "avg"]
    assert list(table.index) == ["refuel", "rebel-lt"]
    assert table.loc["refuel", "h=1"].startswith("66.7 [")
    assert table.loc["refuel", "h=1"].count(",") == 1 and table.loc["refuel", "h=1"].endswith("]")


def test_save_report_writes_csv_round_trip_and_png(tmp_path: Path) -> None:
    frame = pd.concat(
        [
            *(judgements({1: [1, 0, 1, 1], 2: [1, 1, 0, math.nan]}, method) for method in ("refuel", "dpo-lt")),
            judgements({1: [1], 2: [math.nan]}, "one-prompt"),  # NaN win rate and bounds must survive both files
        ]
    )
    rates = per_turn_win_rates(frame, n_resamples=200)
    paths = save_report(rates, tmp_path / "report", "REFUEL vs base")
    assert paths == {"csv": tmp_path / "report" / "win_rates.csv", "png": tmp_path / "report" / "win_rates.png"}
    pd.testing.assert_frame_equal(pd.read_csv(paths["csv"]), rates, check_dtype=False)
    assert paths["png"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in paths["png"].parent.iterdir()) == ["win_rates.csv", "win_rates.png"]


def test_report_functions_reject_frames_without_rate_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rates is missing columns"):
        paper_table(pd.DataFrame({"method": ["a"]}))
    with pytest.raises(ValueError, match="rates is missing columns"):
        save_report(pd.DataFrame({"method": ["a"]}), tmp_path, "title")


def test_probabilities_between_outcomes_are_accepted() -> None:
    rates = per_turn_win_rates(judgements({1: [0.7, 0.3, 1.0]}), n_resamples=200)
    assert row(rates, "refuel", "1")["win_rate"] == pytest.approx(200 / 3)


def test_count_table_layout() -> None:
    rates = per_turn_win_rates(judgements({1: [1, 0, 1], 2: [1, math.nan, math.nan]}), n_resamples=100)
    table = count_table(rates)
    assert list(table.columns) == ["h=1", "h=2", "avg"]
    assert table.loc["refuel"].tolist() == ["3", "1 (+2 invalid)", "4 (+2 invalid)"]


def test_judge_statistics_of_a_two_order_judge() -> None:
    frame = pd.DataFrame(
        {
            "method": ["a", "a", "a", "a", "b"],
            "prompt_id": ["p1", "p2", "p3", "p4", "p1"],
            "turn": [1, 1, 1, 1, 1],
            "outcome": [1.0, 0.5, math.nan, math.nan, 0.5],
            "reason": [None, None, "unparsable_verdict", "ended_before_turn", None],
            "verdict_ab": ["A", "A", None, None, "B"],
            "verdict_ba": ["B", "A", "B", None, "B"],
        }
    )
    stats = judge_statistics(frame).set_index("method")
    assert list(stats.index) == ["a", "b", "all"]
    a = stats.loc["a"]
    assert (a["pairs"], a["judged"], a["invalid"]) == (4, 2, 2)
    assert a["invalid_reasons"] == "ended_before_turn: 1; unparsable_verdict: 1"
    assert a["tie_rate"] == 50.0
    assert a["position_bias_rate"] == 50.0  # p1 consistent (A, B), p2 followed the slot (A, A)
    assert a["first_slot_rate"] == pytest.approx(100 * 3 / 5)  # A, B, A, A, B parsed (p4 was never shown)
    assert a["unparsable_verdicts"] == 1
    assert stats.loc["all", "position_bias_rate"] == pytest.approx(100 * 2 / 3)


def test_judge_statistics_of_a_reward_judge_have_no_position_rates() -> None:
    frame = judgements({1: [1.0, 0.5, 0.5, math.nan]}).assign(reason=[None, None, None, "reward_nan"])
    stats = judge_statistics(frame).set_index("method")
    assert stats.loc["refuel", "tie_rate"] == pytest.approx(200 / 3)
    assert stats.loc["refuel", "invalid_reasons"] == "reward_nan: 1"
    assert stats.loc["refuel", ["position_bias_rate", "first_slot_rate", "unparsable_verdicts"]].isna().all()
