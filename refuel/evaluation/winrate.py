"""Per-turn win rates against a baseline, with bootstrap confidence intervals, a paper-style table and a plot.

The win rate at turn h is the fraction of prompts where the candidate's dialogue truncated at turn h is judged
better than the baseline's dialogue truncated at turn h, a tie counting ½. This is how the REFUEL paper reports its
GPT-4 judged win rates per turn h = 1..5 plus their average (Gao et al., "Regressing the Relative Future: Efficient
Policy Optimization for Multi-turn RLHF", arXiv 2410.04612). Rates are reported in percent (0-100).

The pipeline is a judge (``dialogsim.judges``) per pair → a long frame of outcomes → ``per_turn_win_rates`` →
``paper_table`` / ``count_table`` / ``save_report``; ``judge_statistics`` reports the judge's tie, position-bias and
invalid rates from the same frame.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from dialogsim.judges.base import ENDED_BEFORE_TURN
from refuel.storage import atomic_path

JUDGEMENT_COLUMNS = ("method", "prompt_id", "turn", "outcome")
RATE_COLUMNS = ("method", "turn", "win_rate", "ci_low", "ci_high", "n", "ties", "invalid")
AVG_TURN = "avg"
VERDICT_COLUMNS = ("verdict_ab", "verdict_ba")


def per_turn_win_rates(
    judgements: pd.DataFrame, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Win rate of each method against the baseline at each turn h, and averaged over turns, with bootstrap CIs.

    The win rate at turn h is the fraction of prompts where the candidate's dialogue truncated at turn h is judged
    better than the baseline's, ties = ½ (the REFUEL paper's GPT-4 judged win rates, arXiv 2410.04612).

    Args:
        judgements: long frame, one row per (method, prompt_id, turn), with columns ``method`` (str),
            ``prompt_id`` (str), ``turn`` (int, 1-based h) and ``outcome`` (P(candidate is better) in [0, 1]: 1.0
            win, 0.5 tie, 0.0 loss, NaN invalid judgement; see ``dialogsim.judges``).
        confidence: confidence level of the intervals, in (0, 1).
        n_resamples: bootstrap resamples per interval.
        seed: seed of the ``numpy.random.Generator`` drawn afresh for every interval, so a row's interval depends
            only on its own outcomes and the seed, not on which other methods are in the frame.

    Returns:
        One row per (method, turn) in ``RATE_COLUMNS`` order, methods in order of first appearance, then turns
        ascending, then one ``turn == "avg"`` row per method. ``turn`` is a string label ("1", "2", ..., "avg").
        ``win_rate``, ``ci_low``, ``ci_high`` are percent (0-100): per turn, the mean outcome over the judged
        prompts and the percentile bootstrap interval of that mean (``scipy.stats.bootstrap``); all-equal outcomes
        give an interval collapsed to the point, and fewer than 2 judged prompts give NaN bounds. ``n`` counts
        judged dialogues, ``ties`` outcomes of 0.5, ``invalid`` NaN outcomes (excluded from the rate). The avg row
        is the mean over turns of the per-turn win rates (the paper's layout); its interval resamples prompts
        (each keeping all its turns) and averages over turns; its counts are totals over turns.

    Raises:
        ValueError: if columns are missing, a turn is not a positive integer, an outcome is outside [0, 1] (and not
            NaN), or a (method, prompt_id, turn) appears twice.
    """
    frame = _validated_judgements(judgements)
    rows = []
    for method, by_method in frame.groupby("method", sort=False):
        for turn, by_turn in by_method.groupby("turn"):
            judged = by_turn["outcome"].dropna().to_numpy()[:, None]  # [prompts judged at turn h, 1]
            rows.append(_rate_row(method, str(turn), by_turn["outcome"], judged, confidence, n_resamples, seed))
        outcomes = by_method.pivot(index="prompt_id", columns="turn", values="outcome").dropna(how="all")
        outcomes = outcomes.to_numpy()  # [prompts with any judged turn, turns], NaN = invalid or not judged
        rows.append(_rate_row(method, AVG_TURN, by_method["outcome"], outcomes, confidence, n_resamples, seed))
    return pd.DataFrame(rows, columns=list(RATE_COLUMNS))


def paper_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Format per-turn win rates as the REFUEL paper's tables (arXiv 2410.04612).

    Args:
        rates: output of ``per_turn_win_rates`` (columns ``RATE_COLUMNS``).

    Returns:
        One row per method (index ``method``, in input order), columns ``h=1`` .. ``h=H`` then ``avg``; each cell is
        the win rate in percent with its interval, e.g. ``"55.2 [48.1, 62.0]"`` (``nan`` where undefined, empty
        where a method has no judgements at that turn).

    Raises:
        ValueError: if columns are missing.
    """
    _require_columns(rates, RATE_COLUMNS, "rates")
    cells = [f"{w:.1f} [{lo:.1f}, {hi:.1f}]" for w, lo, hi in rates[["win_rate", "ci_low", "ci_high"]].to_numpy()]
    return _method_by_turn(rates, cells)


def count_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Dialogue pairs judged per method and turn, in the layout of ``paper_table``.

    Args:
        rates: output of ``per_turn_win_rates``.

    Returns:
        One row per method, columns ``h=1`` .. ``h=H`` then ``avg`` (totals); each cell is the number of judged
        pairs ``n``, followed by ``(+k invalid)`` when k judgements were invalid.

    Raises:
        ValueError: if columns are missing.
    """
    _require_columns(rates, RATE_COLUMNS, "rates")
    cells = [
        f"{n}" + (f" (+{invalid} invalid)" if invalid else "") for n, invalid in rates[["n", "invalid"]].to_numpy()
    ]
    return _method_by_turn(rates, cells)


def judge_statistics(judgements: pd.DataFrame) -> pd.DataFrame:
    """How the judge behaved, per method and over all methods (row ``"all"``), from the judgements frame.

    Args:
        judgements: long frame with ``method`` and ``outcome`` (as for ``per_turn_win_rates``); optional
            ``reason`` (why an outcome is NaN) and, for a two-order LLM judge, ``verdict_ab`` / ``verdict_ba``
            ("A", "B" or missing; ``ab`` = the candidate shown as A).

    Returns:
        One row per method then ``"all"``, columns: ``pairs`` (judgements), ``judged`` (valid ones),
        ``invalid`` and ``invalid_reasons`` (e.g. ``"unparsable_verdict: 3"``), ``tie_rate`` (% of valid
        judgements at ½), ``position_bias_rate`` (% of pairs with both verdicts parsed whose two verdicts name
        the same slot, i.e. the judge followed the position, not the dialogue), ``first_slot_rate`` (% of parsed
        verdicts that chose slot A; 50 = no slot preference) and ``unparsable_verdicts`` (single-order replies
        without a verdict). The last three are NaN for judges without verdict columns (reward models, which
        have no position bias).

    Raises:
        ValueError: if ``method`` or ``outcome`` is missing.
    """
    _require_columns(judgements, ("method", "outcome"), "judgements")
    groups = [(str(method), group) for method, group in judgements.groupby("method", sort=False)]
    return pd.DataFrame([_judge_row(name, frame) for name, frame in [*groups, ("all", judgements)]])


def _judge_row(name: str, frame: pd.DataFrame) -> dict[str, object]:
    outcomes = frame["outcome"].astype(float)
    reasons = Counter(frame["reason"].dropna()) if "reason" in frame else Counter()
    return {
        "method": name,
        "pairs": len(frame),
        "judged": int(outcomes.notna().sum()),
        "invalid": int(outcomes.isna().sum()),
        "invalid_reasons": "; ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items())),
        "tie_rate": _percent(outcomes.dropna() == 0.5),
        **_verdict_rates(frame),
    }


def _verdict_rates(frame: pd.DataFrame) -> dict[str, float]:
    """Position-bias rate, first-slot rate (percent) and unparsable count of a two-order judge; NaN without one."""
    if not set(VERDICT_COLUMNS) <= set(frame.columns):
        return {"position_bias_rate": math.nan, "first_slot_rate": math.nan, "unparsable_verdicts": math.nan}
    asked = frame["reason"] != ENDED_BEFORE_TURN if "reason" in frame else slice(None)  # pairs the judge saw
    verdicts = frame.loc[asked, list(VERDICT_COLUMNS)]
    verdicts = verdicts.where(verdicts.isin(["A", "B"]))  # [pairs seen, 2], NaN = unparsable
    both = verdicts.dropna()
    return {
        "position_bias_rate": _percent(both["verdict_ab"] == both["verdict_ba"]),
        "first_slot_rate": _percent(pd.Series(verdicts.to_numpy().ravel()).dropna() == "A"),
        "unparsable_verdicts": int(verdicts.isna().to_numpy().sum()),
    }


def _percent(flags: pd.Series) -> float:
    """Percentage of true values; NaN for an empty series."""
    return 100 * float(flags.mean()) if len(flags) else math.nan


def _method_by_turn(rates: pd.DataFrame, cells: list[str]) -> pd.DataFrame:
    """Cells of ``rates`` rows arranged as the paper's table: methods × (``h=1`` .. ``h=H``, ``avg``)."""
    frame = rates.assign(
        column=[AVG_TURN if turn == AVG_TURN else f"h={turn}" for turn in rates["turn"]],
        cell=cells,
    )
    turns = sorted({int(turn) for turn in rates["turn"] if turn != AVG_TURN})
    table = frame.pivot(index="method", columns="column", values="cell")
    table = table.reindex(index=pd.unique(rates["method"]), columns=[*(f"h={turn}" for turn in turns), AVG_TURN])
    table.columns.name = None
    return table.fillna("")


def save_report(rates: pd.DataFrame, out_dir: Path, title: str) -> dict[str, Path]:
    """Write the win-rate table and plot into ``out_dir``, each file atomically (temp file + ``os.replace``).

    Args:
        rates: output of ``per_turn_win_rates``.
        out_dir: folder to write into; created if missing.
        title: plot title, e.g. "REFUEL iter 2 vs Llama-3-8B-it (GPT-4 judge)".

    Returns:
        ``{"csv": out_dir / "win_rates.csv", "png": out_dir / "win_rates.png"}``. The CSV is ``rates`` unchanged
        (no index; ``pd.read_csv`` reads it back). The PNG plots win rate (%) vs turn h per method with CI error
        bars and a dashed 50 % line (parity with the baseline); the legend gives each method's avg.

    Raises:
        ValueError: if columns are missing.
    """
    _require_columns(rates, RATE_COLUMNS, "rates")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "win_rates.csv", "png": out_dir / "win_rates.png"}
    with atomic_path(paths["csv"]) as tmp:
        rates.to_csv(tmp, index=False)
    with atomic_path(paths["png"]) as tmp:
        _plot(rates, title).savefig(tmp, format="png", dpi=120)
    return paths


def _mean_over_turns(*turn_outcomes: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over turns of the per-turn mean outcome: one array per turn, prompts along ``axis``, NaN left out.

    The signature is scipy's vectorised, paired statistic: each array is ``[..., prompts]`` and the result ``[...]``.
    A turn without any judged prompt makes the result NaN.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        return np.mean([np.nanmean(outcomes, axis=axis) for outcomes in turn_outcomes], axis=0)


def _rate_row(
    method: str,
    turn: str,
    outcomes: pd.Series,
    matrix: np.ndarray,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> dict[str, object]:
    """One ``per_turn_win_rates`` row: counts from long ``outcomes``, rate and CI from ``matrix`` [prompts, turns]."""
    win_rate = 100 * float(_mean_over_turns(*matrix.T))
    ci_low, ci_high = _bootstrap_interval(matrix, confidence, n_resamples, seed)
    return {
        "method": method,
        "turn": turn,
        "win_rate": win_rate,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "n": int(outcomes.count()),
        "ties": int((outcomes == 0.5).sum()),
        "invalid": int(outcomes.isna().sum()),
    }


def _bootstrap_interval(matrix: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval (percent) of ``_mean_over_turns``, resampling prompts (rows of ``matrix``).

    ``scipy.stats.bootstrap`` draws the resamples; the percentiles are taken with ``np.nanpercentile`` because a
    resample that happens to hold no judged prompt at some turn (possible only when NaN outcomes are present) has
    an undefined statistic and is left out, where scipy's own interval would turn NaN. NaN bounds below 2 prompts
    or when a turn has no judged prompt at all (the win rate itself is then NaN).
    """
    if matrix.shape[0] < 2 or np.isnan(matrix).all(axis=0).any():
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=stats.DegenerateDataWarning)  # scipy's interval is not used
        result = stats.bootstrap(
            tuple(matrix.T),  # one sample per turn, paired by prompt
            _mean_over_turns,
            n_resamples=n_resamples,
            vectorized=True,
            paired=True,
            confidence_level=confidence,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    tail = 50 * (1 - confidence)  # percent in each tail
    low, high = np.nanpercentile(result.bootstrap_distribution, [tail, 100 - tail])
    return 100 * float(low), 100 * float(high)


def _validated_judgements(judgements: pd.DataFrame) -> pd.DataFrame:
    """Check the long judgements frame of ``per_turn_win_rates`` and return its four columns with float outcomes."""
    _require_columns(judgements, JUDGEMENT_COLUMNS, "judgements")
    frame = judgements.loc[:, list(JUDGEMENT_COLUMNS)].astype({"outcome": float})
    turns = frame["turn"]
    if not pd.api.types.is_integer_dtype(turns) or (turns < 1).any():
        raise ValueError(f"judgements 'turn' must be integers >= 1 (1-based h), got {sorted(turns.unique())[:10]}")
    bad_outcomes = frame.loc[frame["outcome"].notna() & ~frame["outcome"].between(0.0, 1.0), "outcome"]
    if len(bad_outcomes):
        raise ValueError(
            f"judgements 'outcome' must be a probability in [0, 1] or NaN (P(candidate is better)); got "
            f"{bad_outcomes.iloc[0]} at row {bad_outcomes.index[0]}"
        )
    duplicated = frame.duplicated(["method", "prompt_id", "turn"])
    if duplicated.any():
        first = frame.loc[duplicated, ["method", "prompt_id", "turn"]].iloc[0].tolist()
        raise ValueError(f"judgements has {duplicated.sum()} repeated (method, prompt_id, turn) rows, e.g. {first}")
    return frame


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], name: str) -> None:
    """Raise ValueError naming the columns of ``columns`` missing from ``frame`` and listing the ones it has."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing columns {missing}; got columns {list(frame.columns)}")


def _plot(rates: pd.DataFrame, title: str) -> Figure:
    """Win rate (%) vs turn h, one error-bar line per method, on an Agg canvas (no pyplot global state)."""
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    methods = pd.unique(rates["method"])
    offsets = np.linspace(-0.08, 0.08, len(methods)) if len(methods) > 1 else [0.0]  # dodge overlapping bars
    for method, offset in zip(methods, offsets, strict=True):
        of_method = rates[rates["method"] == method]
        per_turn = of_method[of_method["turn"] != AVG_TURN]
        avg = of_method.loc[of_method["turn"] == AVG_TURN, "win_rate"]
        turns = per_turn["turn"].astype(int).to_numpy()
        error = [per_turn["win_rate"] - per_turn["ci_low"], per_turn["ci_high"] - per_turn["win_rate"]]
        label = f"{method} (avg {avg.iloc[0]:.1f})" if len(avg) else method
        axes.errorbar(turns + offset, per_turn["win_rate"], yerr=np.array(error), marker="o", capsize=3, label=label)
    axes.axhline(50, linestyle="--", color="grey", linewidth=1)
    axes.set(xlabel="turn h", ylabel="win rate vs baseline (%)", title=title, ylim=(0, 100))
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend()
    return figure
