"""Summary of an experiment (``scripts/experiment.sh``): does training move the policy, and if not, why?

Reads a run folder ``<run_dir>/<method>/iteration_<t>/`` per method (``refuel-train``'s layout) and the judge
folder of ``refuel-evaluate`` (``win_rates.csv``, ``judgements.csv``, ``diagnostics.csv``), and reports:

* the paper's method × turn win-rate table with bootstrap 95 % intervals, and whether each interval contains 50 %;
* per turn, the held-out prompts a 95 % interval would need to exclude 50 % at the observed win rate and spread
  (normal approximation: n = (1.96 · sd / (p − ½))², sd the standard deviation of the per-prompt outcomes);
* with ``--contrast A B`` (two method labels of ``judgements.csv``, e.g. ``"REFUEL π_2" "REBEL-LT π_2"``): per turn,
  the win-rate difference A − B with a paired bootstrap 95 % interval over prompts, and the prompts that would
  exclude 0 (:func:`paired_difference`);
* the per-turn diagnostics of every policy (copied from ``diagnostics.csv``);
* per iteration: the validation loss and sign agreement before and after training (``metrics.json``), and the
  spread of the regression target r − r' over the collected pairs (:func:`pair_statistics`);
* the measured speeds of collection, training and evaluation, and the time they project for a budget
  (:func:`measured_speeds`, :func:`projected_minutes`).

Writes ``<run_dir>/summary.json`` and ``<run_dir>/summary.md`` (atomically) and prints the markdown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dialogsim.console import UsageError, console_command
from refuel.cli import parse_config
from refuel.evaluation.winrate import AVG_TURN, paper_table
from refuel.storage import atomic_path, read_rows, write_json

Z_95 = 1.959964  # two-sided 95 % normal quantile


@dataclass
class AnalysisConfig:
    """Where an experiment's files are; the ``python -m refuel.evaluation.analysis`` flags are generated from it."""

    run_dir: str = field(default="runs/experiment", metadata={"help": "folder holding <method>/iteration_<t>/"})
    eval_dir: str = field(
        default="runs/experiment/eval/reward-math_format",
        metadata={"help": "refuel-evaluate's judge folder (win_rates.csv, judgements.csv, diagnostics.csv)"},
    )
    methods: list[str] = field(
        default_factory=lambda: ["refuel", "rebel_lt", "dpo_lt"], metadata={"help": "method folders in run_dir"}
    )
    budget_pairs: int = field(default=1280, metadata={"help": "pairs the projected run collects"})
    budget_pair_epochs: int = field(default=2304, metadata={"help": "training pairs × epochs the projected run does"})
    budget_dialogues: int = field(default=1000, metadata={"help": "evaluation dialogues (policies × prompts)"})
    contrast: list[str] = field(
        default_factory=list,
        metadata={"help": "two method labels of judgements.csv, A B: the per-turn difference A − B (paired by prompt)"},
    )


@dataclass
class PairStatistics:
    """Spread of the regression target d = r − r' over collected pairs (reward units; squares in reward units²).

    Attributes:
        pairs: pairs with both rewards finite.
        mean: mean of d (0 in expectation: y and y' are exchangeable).
        variance: sample variance of d (ddof 1; NaN below 2 pairs).
        std: its square root.
        tie_share: share of pairs with r = r' (no signal for the regression, and left out of the sign agreement).
        pairs_last_turn / pairs_rollout: pairs with h = H (nothing follows the turn-h reply) / with h < H
            (the simulated user and π_t continue both dialogues after the reply).
        mean_abs_last_turn / mean_abs_rollout: mean |d| of each group (NaN when empty).
        mean_square_last_turn / mean_square_rollout: mean d² of each group (NaN when empty).
        reply_share: mean_square_last_turn / mean_square_rollout. If a turn-h reply moves the horizon reward as
            much with a roll-out after it as without, this estimates the share of E[d²] on roll-out pairs that the
            reply explains; the rest is roll-out noise the turn-h policy does not control. NaN when a group is
            empty or the roll-out pairs have d = 0.
    """

    pairs: int
    mean: float
    variance: float
    std: float
    tie_share: float
    pairs_last_turn: int
    pairs_rollout: int
    mean_abs_last_turn: float
    mean_abs_rollout: float
    mean_square_last_turn: float
    mean_square_rollout: float
    reply_share: float


def pair_statistics(rows: Sequence[Mapping[str, Any]]) -> PairStatistics:
    """:class:`PairStatistics` of pair rows (``refuel.collection.collect.pair_record``: ``reward``, ``reward_prime``,
    ``turn`` = h, ``horizon`` = H); rows with a missing (``None``, as JSON writes NaN) or non-finite reward are
    left out.

    Raises:
        ValueError: a row lacks one of those keys.
    """
    missing = [key for key in ("reward", "reward_prime", "turn", "horizon") if rows and key not in rows[0]]
    if missing:
        raise ValueError(f"pair rows need reward, reward_prime, turn and horizon; missing {missing}")
    kept = [row for row in rows if _finite(row["reward"]) and _finite(row["reward_prime"])]
    difference = np.array([row["reward"] - row["reward_prime"] for row in kept], dtype=float)  # [pairs]
    last = np.array([row["turn"] == row["horizon"] for row in kept], dtype=bool)  # [pairs]
    square_last, square_rollout = _mean(difference[last] ** 2), _mean(difference[~last] ** 2)
    variance = float(np.var(difference, ddof=1)) if len(difference) > 1 else math.nan
    return PairStatistics(
        pairs=len(kept),
        mean=_mean(difference),
        variance=variance,
        std=math.sqrt(variance) if math.isfinite(variance) else math.nan,
        tie_share=_mean(difference == 0),
        pairs_last_turn=int(last.sum()),
        pairs_rollout=int((~last).sum()),
        mean_abs_last_turn=_mean(np.abs(difference[last])),
        mean_abs_rollout=_mean(np.abs(difference[~last])),
        mean_square_last_turn=square_last,
        mean_square_rollout=square_rollout,
        reply_share=square_last / square_rollout if square_rollout > 0 else math.nan,
    )


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def iteration_summary(iteration_dir: Path) -> dict[str, Any]:
    """One iteration's validation (``metrics.json``) and pair statistics (``pairs.jsonl``) as a flat dict.

    Keys: ``iteration``, ``pairs``, ``train_pairs``, ``validation_pairs``, ``dropped``, ``user_parse_rate``,
    ``validation_loss_before`` / ``_after`` (nats²), ``validation_sign_agreement_before`` / ``_after``,
    ``train_sign_agreement_after``, and the :class:`PairStatistics` fields prefixed ``difference_``.

    Raises:
        FileNotFoundError: the iteration has no ``metrics.json`` (not trained yet).
    """
    metrics = json.loads((iteration_dir / "metrics.json").read_text())
    statistics = pair_statistics(read_rows(iteration_dir / "pairs.jsonl"))
    return {
        "iteration": metrics["iteration"],
        "pairs": metrics["pairs"],
        "train_pairs": metrics["train_pairs"],
        "validation_pairs": metrics["validation_pairs"],
        "dropped": metrics.get("dropped", {}),
        "user_parse_rate": metrics.get("user_parse_rate", math.nan),
        "validation_loss_before": metrics["validation_before"]["loss"],
        "validation_loss_after": metrics["validation_after"]["loss"],
        "validation_sign_agreement_before": metrics["validation_before"]["sign_agreement"],
        "validation_sign_agreement_after": metrics["validation_after"]["sign_agreement"],
        "train_sign_agreement_after": metrics["train_fit_after"]["sign_agreement"],
        **{f"difference_{key}": value for key, value in asdict(statistics).items()},
    }


@dataclass
class Speeds:
    """Measured speeds (per minute of wall time on the machine that ran the experiment).

    Attributes:
        collection_pairs_per_minute: reset points tried (kept + dropped) / ``collection_seconds`` of
            ``collection.json``, pooled over iterations; a copied collection (byte-identical ``collection.json``,
            DPO-LT's first iteration) counts once.
        training_pair_epochs_per_minute: median over iterations of training pairs × epochs / the seconds between
            ``collection.json`` and ``metrics.json`` (π_t log-probs, validation before and after, gradient steps,
            saving; includes the model load). An iteration interrupted by a kill counts its pause too, hence
            the median.
        evaluation_dialogues_per_minute: evaluation dialogues (policies × prompts) / the seconds of the
            ``evaluate*`` stages in ``timings.tsv`` (``evaluate-refuel`` generates REFUEL's and π_0's dialogues,
            ``evaluate`` the others from the same cache; model loads, generation, judging, diagnostics); NaN
            without them.
    """

    collection_pairs_per_minute: float
    training_pair_epochs_per_minute: float
    evaluation_dialogues_per_minute: float


def measured_speeds(run_dir: Path, methods: Sequence[str], dialogues: int | None) -> Speeds:
    """:class:`Speeds` from the files of a finished run (``dialogues``: evaluation dialogues generated)."""
    collections: dict[str, tuple[int, float]] = {}
    training: list[float] = []
    for method in methods:
        epochs = json.loads((run_dir / method / "config.json").read_text())["epochs"]
        for iteration_dir in sorted((run_dir / method).glob("iteration_*")):
            collection, metrics = iteration_dir / "collection.json", iteration_dir / "metrics.json"
            if not metrics.exists():
                continue
            text, trained = collection.read_text(), json.loads(metrics.read_text())
            stats = json.loads(text)
            collections[text] = (trained["pairs"] + sum(stats.get("dropped", {}).values()), stats["collection_seconds"])
            seconds = metrics.stat().st_mtime - collection.stat().st_mtime
            training.append(60 * trained["train_pairs"] * epochs / seconds)
    pairs, seconds = (sum(values) for values in zip(*collections.values(), strict=True)) if collections else (0, 0)
    stage = sum(
        seconds for name, seconds in _stage_seconds(run_dir / "timings.tsv").items() if name.startswith("evaluate")
    )
    return Speeds(
        collection_pairs_per_minute=60 * pairs / seconds if seconds else math.nan,
        training_pair_epochs_per_minute=float(np.median(training)) if training else math.nan,
        evaluation_dialogues_per_minute=60 * dialogues / stage if stage and dialogues else math.nan,
    )


def _stage_seconds(path: Path) -> dict[str, float]:
    """``timings.tsv`` (stage, seconds, finished at) → stage → seconds of its latest complete run."""
    if not path.exists():
        return {}
    return {line.split("\t")[0]: float(line.split("\t")[1]) for line in path.read_text().splitlines() if line}


def projected_minutes(speeds: Speeds, pairs: int, pair_epochs: int, dialogues: int) -> dict[str, float]:
    """Wall minutes of a run of ``pairs`` collected pairs, ``pair_epochs`` training pair-epochs and ``dialogues``
    evaluation dialogues at ``speeds``: ``collection``, ``training``, ``evaluation`` and ``total``."""
    minutes = {
        "collection": pairs / speeds.collection_pairs_per_minute,
        "training": pair_epochs / speeds.training_pair_epochs_per_minute,
        "evaluation": dialogues / speeds.evaluation_dialogues_per_minute,
    }
    return minutes | {"total": sum(minutes.values())}


def prompts_to_resolve(judgements: pd.DataFrame) -> pd.DataFrame:
    """Per (method, turn): mean outcome p, the outcome's standard deviation sd over prompts (ddof 1), and the
    prompts n = ⌈(1.96 · sd / (p − ½))²⌉ a 95 % normal interval needs to exclude ½ at that p and sd (NaN at p = ½).

    Args:
        judgements: ``judgements.csv`` of ``refuel-evaluate`` (``method``, ``turn``, ``outcome``; NaN = invalid).
    """
    rows = []
    for (method, turn), group in judgements.dropna(subset=["outcome"]).groupby(["method", "turn"], sort=False):
        p, sd = group["outcome"].mean(), group["outcome"].std(ddof=1)
        gap = abs(p - 0.5)
        needed = math.ceil((Z_95 * sd / gap) ** 2) if gap > 0 and math.isfinite(sd) else math.nan
        rows.append({"method": method, "turn": int(turn), "win_rate": 100 * p, "sd": sd, "prompts_needed": needed})
    return pd.DataFrame(rows, columns=["method", "turn", "win_rate", "sd", "prompts_needed"])


def paired_difference(judgements: pd.DataFrame, first: str, second: str, seed: int = 0) -> pd.DataFrame:
    """Per turn h: the win-rate difference ``first`` − ``second`` against the same baseline, paired by prompt.

    Both methods were judged against the baseline on the same held-out prompts, so the per-prompt outcome
    difference d = o_first − o_second removes the prompts' shared difficulty. The interval is a percentile
    bootstrap over prompts (``scipy.stats.bootstrap``, 9,999 resamples, ``paired=True``); ``prompts_needed`` is
    the normal-approximation count n = ⌈(1.96 · sd(d) / mean(d))²⌉ for a 95 % interval to exclude 0.

    Args:
        judgements: ``judgements.csv`` of ``refuel-evaluate`` (``method``, ``prompt_id``, ``turn``, ``outcome``).
        first / second: method labels in ``judgements["method"]``.
        seed: the bootstrap's seed.

    Returns:
        One row per turn: ``turn``, ``difference`` (points, first − second), ``ci_low``, ``ci_high`` (points),
        ``prompts`` (judged for both), ``prompts_needed``.

    Raises:
        UsageError: a label absent from ``judgements`` (the message lists the labels present).
    """
    from scipy import stats

    labels = sorted(judgements["method"].unique())
    missing = [label for label in (first, second) if label not in labels]
    if missing:
        raise UsageError(f"--contrast {' '.join(missing)}: no such method in judgements.csv; its methods: {labels}")
    outcomes = judgements.dropna(subset=["outcome"]).pivot_table(
        index=["turn", "prompt_id"], columns="method", values="outcome"
    )
    rows = []
    for turn, group in outcomes[[first, second]].dropna().groupby(level="turn"):
        d = (group[first] - group[second]).to_numpy()  # [prompts]
        mean, sd = float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else math.nan
        low = high = math.nan
        if len(d) > 1 and sd > 0:
            interval = stats.bootstrap(
                (group[first].to_numpy(), group[second].to_numpy()),
                lambda a, b, axis=-1: np.mean(a - b, axis=axis),
                paired=True,
                vectorized=True,
                n_resamples=9_999,
                method="percentile",
                rng=np.random.default_rng(seed),
            ).confidence_interval
            low, high = interval.low, interval.high
        needed = math.ceil((Z_95 * sd / mean) ** 2) if mean != 0 and math.isfinite(sd) else math.nan
        rows.append(
            {
                "turn": int(turn),
                "difference": 100 * mean,
                "ci_low": 100 * low,
                "ci_high": 100 * high,
                "prompts": len(d),
                "prompts_needed": needed,
            }
        )
    return pd.DataFrame(rows, columns=["turn", "difference", "ci_low", "ci_high", "prompts", "prompts_needed"])


def summarize(config: AnalysisConfig) -> dict[str, Any]:
    """Everything in the module docstring as one JSON-serialisable dict (missing evaluation files: left out).

    Raises:
        UsageError: ``run_dir`` is not a folder.
    """
    run_dir, eval_dir = Path(config.run_dir), Path(config.eval_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--run_dir {run_dir}: no such folder; give the experiment's folder (<method>/iteration_<t>/)")
    iterations = {
        method: [iteration_summary(path.parent) for path in sorted((run_dir / method).glob("iteration_*/metrics.json"))]
        for method in config.methods
    }
    summary: dict[str, Any] = {"iterations": iterations}
    dialogues = None
    if (eval_dir / "win_rates.csv").exists():
        rates = pd.read_csv(eval_dir / "win_rates.csv", dtype={"turn": str})
        judgements = pd.read_csv(eval_dir / "judgements.csv")
        diagnostics = pd.read_csv(eval_dir / "diagnostics.csv")
        per_turn = rates[rates["turn"] != AVG_TURN]
        summary |= {
            "win_rates": rates.to_dict("records"),
            "table": paper_table(rates).reset_index().to_dict("records"),
            "every_interval_contains_50": bool(((per_turn["ci_low"] <= 50) & (per_turn["ci_high"] >= 50)).all()),
            "prompts_to_resolve": prompts_to_resolve(judgements).to_dict("records"),
            "diagnostics": diagnostics.to_dict("records"),
        }
        if config.contrast:
            if len(config.contrast) != 2:
                raise UsageError(f"--contrast takes two method labels, A B; got {config.contrast}")
            summary["contrast"] = {
                "methods": config.contrast,
                "per_turn": paired_difference(judgements, *config.contrast).to_dict("records"),
            }
        dialogues = int(diagnostics.groupby("method")["dialogues"].max().sum())
    speeds = measured_speeds(run_dir, config.methods, dialogues)
    summary["speeds"] = asdict(speeds)
    summary["projection"] = {
        "budget": {
            "pairs": config.budget_pairs,
            "pair_epochs": config.budget_pair_epochs,
            "dialogues": config.budget_dialogues,
        },
        "minutes": projected_minutes(speeds, config.budget_pairs, config.budget_pair_epochs, config.budget_dialogues),
    }
    return summary


def markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a markdown report (tables with 3 decimals; rates in %)."""
    parts = []
    if "table" in summary:
        parts += [
            "## Win rate (%) vs π_0, judge = training reward, ties ½, bootstrap 95 % intervals",
            markdown_table(pd.DataFrame(summary["table"])),
            f"\nEvery per-turn interval contains 50 %: {summary['every_interval_contains_50']}",
            "\n## Held-out prompts a 95 % interval would need to exclude 50 % (at the observed rate and spread)",
            markdown_table(pd.DataFrame(summary["prompts_to_resolve"])),
            "\n## Per-turn diagnostics of each policy's own dialogues (rates in %)",
            markdown_table(pd.DataFrame(summary["diagnostics"])),
        ]
    if "contrast" in summary:
        first, second = summary["contrast"]["methods"]
        parts += [
            f"\n## {first} − {second}: win-rate difference (points), paired bootstrap 95 % intervals over prompts",
            markdown_table(pd.DataFrame(summary["contrast"]["per_turn"])),
        ]
    rows = [{"method": method} | row for method, items in summary["iterations"].items() for row in items]
    if rows:
        frame = pd.DataFrame(rows).drop(columns=["dropped"])
        validation = [column for column in frame.columns if "loss" in column or "sign_agreement" in column]
        differences = [column for column in frame.columns if column.startswith("difference_")]
        parts += [
            "\n## Validation per iteration (held-out pairs; sign agreement of the log-ratio with r − r')",
            markdown_table(frame[["method", "iteration", "pairs", "validation_pairs", *validation]]),
            "\n## r − r' over each iteration's collected pairs"
            " (reply_share: see refuel/evaluation/analysis.py PairStatistics)",
            markdown_table(frame[["method", "iteration", *differences]].rename(columns=_without_prefix)),
        ]
    projection = summary["projection"]
    parts += [
        "\n## Measured speeds (per wall minute) and the projected run",
        markdown_table(pd.DataFrame([summary["speeds"]])),
        f"\nBudget {projection['budget']} → minutes "
        + ", ".join(f"{key} {value:.1f}" for key, value in projection["minutes"].items()),
    ]
    return "\n".join(parts) + "\n"


def markdown_table(frame: pd.DataFrame) -> str:
    """``frame`` as a GitHub markdown table, floats with 3 decimals, no index."""
    cells = [[f"{value:.3f}" if isinstance(value, float) else str(value) for value in row] for row in frame.to_numpy()]
    lines = [list(map(str, frame.columns)), ["---"] * len(frame.columns), *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _without_prefix(column: str) -> str:
    return column.removeprefix("difference_")


@console_command
def main(argv: list[str]) -> None:
    """Entry point of ``python -m refuel.evaluation.analysis``: write ``summary.json``, ``summary.md``; print it."""
    config = parse_config(AnalysisConfig, argv, description=__doc__)
    summary = summarize(config)
    run_dir = Path(config.run_dir)
    write_json(summary, run_dir / "summary.json")
    text = markdown(summary)
    with atomic_path(run_dir / "summary.md") as staging:
        staging.write_text(text)
    print(text)
    print(f"written: {run_dir / 'summary.json'}, {run_dir / 'summary.md'}")


if __name__ == "__main__":
    main()
