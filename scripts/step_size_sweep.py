"""The table of the step-size sweep (``scripts/step_size_sweep.sh``, issue 26 item 4), printed as markdown.

Per config and policy (π_0, then π_1, π_2, π_3 after 128, 256, 384 pairs collected; 96, 192, 288 trained):
- accuracy at h = 1 on the 500 held-out rows (``diagnostics.csv``), its paired 95 % bootstrap interval of the gain
  over π_0 (per-row correctness from the cached dialogues), and the accuracy on the held-out rows whose turn-1
  question never opens a training row;
- win rate vs π_0 with its 95 % interval (``win_rates.csv``), reply tokens (``diagnostics.csv``);
- of the iteration that trained it: validation sign agreement after training, training-pair sign agreement, the
  standard deviation of r − r' and the share of pairs with one right and one wrong reply
  (:func:`refuel.evaluation.analysis.iteration_summary` over ``metrics.json`` and ``pairs.jsonl``).

    python scripts/step_size_sweep.py --sweep_dir runs/sweep --configs ft_lr1e-5_eta10 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from dialogsim.rewards.turn_answer import turn_answer_correct
from refuel.cli import parse_config
from refuel.config import EvaluateConfig
from refuel.evaluation.analysis import iteration_summary, markdown_table
from refuel.evaluation.evaluate import dialogue_cache
from refuel.storage import read_rows

ITERATIONS = 3
PAIRS_PER_ITERATION = 128
RIGHT_WRONG = 0.75  # |r − r'| ≥ 0.75 ⇔ one reply right and one wrong (turn_answer: 1[right] + 0.25 · 1[boxed])
JUDGE_FOLDER = "reward-turn_answer"


def evaluate_config(run: Path, policies: list[str]) -> EvaluateConfig:
    """The evaluation's settings as ``step_size_sweep.sh`` passed them (to find its dialogue cache files)."""
    argv = ["--config", "configs/arithmetic/eval.yaml", "--horizon", "1", "--backend", "vllm"]
    return parse_config(EvaluateConfig, [*argv, "--candidates", *policies, "--output_dir", str(run / "eval")], "")


def correctness(run: Path, policies: list[str], rows: dict[str, dict]) -> pd.DataFrame:
    """Rows = held-out prompt ids, columns = policies: 1.0 / 0.0 whether the turn-1 reply is right."""
    config = evaluate_config(run, policies[1:])
    columns = {}
    for policy in policies:
        dialogues = read_rows(dialogue_cache(config, policy))
        columns[policy] = {
            d["prompt_id"]: float(
                turn_answer_correct(
                    next(m["content"] for m in d["messages"] if m["role"] == "assistant"),
                    rows[d["prompt_id"]]["meta"]["turn_references"][0],
                )
            )
            for d in dialogues
        }
    return pd.DataFrame(columns)


def paired_interval(gain: np.ndarray, seed: int = 0, resamples: int = 9_999) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean of per-row differences, in points."""
    rng = np.random.default_rng(seed)
    means = gain[rng.integers(0, len(gain), size=(resamples, len(gain)))].mean(axis=1)
    return 100 * float(np.quantile(means, 0.025)), 100 * float(np.quantile(means, 0.975))


def config_table(run: Path, rows: dict[str, dict], unseen: set[str]) -> pd.DataFrame:
    """One row per policy (π_0, π_1, π_2, π_3) of the config in ``run``; ``unseen``: the held-out ids whose turn-1
    question opens no training row."""
    judge = run / "eval" / JUDGE_FOLDER
    diagnostics = pd.read_csv(judge / "diagnostics.csv", dtype={"turn": str}).query("turn == '1'").set_index("method")
    rates = pd.read_csv(judge / "win_rates.csv", dtype={"turn": str}).query("turn == '1'").set_index("method")
    policies = ["smollm2-135m-instruct", *(str(run / f"iteration_{t}" / "policy") for t in range(ITERATIONS))]
    correct = correctness(run, policies, rows)
    products = [prompt_id for prompt_id in correct.index if " times " in rows[prompt_id]["instruction"]]
    sums = [prompt_id for prompt_id in correct.index if " + " in rows[prompt_id]["instruction"]]
    records = []
    for t, policy in enumerate(policies):
        label = "π_0" if t == 0 else f"REFUEL π_{t}"
        record = {
            "policy": label,
            "pairs (trained)": f"{t * PAIRS_PER_ITERATION} ({t * PAIRS_PER_ITERATION * 3 // 4})",
            "accuracy h=1": diagnostics.loc[label, "accuracy"],
            "gain [95 %]": "–",
            "sums / products": f"{100 * correct.loc[sums, policy].mean():.1f} / "
            f"{100 * correct.loc[products, policy].mean():.1f}",
            "accuracy, unseen openings": 100 * correct.loc[sorted(unseen), policy].mean(),
            "win rate vs π_0 [95 %]": "–",
            "reply tokens": diagnostics.loc[label, "reply_tokens"],
        }
        if t:
            gain = (correct[policy] - correct[policies[0]]).dropna().to_numpy()
            low, high = paired_interval(gain)
            record["gain [95 %]"] = f"{100 * gain.mean():+.1f} [{low:+.1f}, {high:+.1f}]"
            rate = rates.loc[label]
            record["win rate vs π_0 [95 %]"] = f"{rate['win_rate']:.1f} [{rate['ci_low']:.1f}, {rate['ci_high']:.1f}]"
            iteration = run / f"iteration_{t - 1}"
            summary = iteration_summary(iteration)
            d = np.array([p["reward"] - p["reward_prime"] for p in read_rows(iteration / "pairs.jsonl")])
            record |= {
                "val. sign agreement": summary["validation_sign_agreement_after"],
                "train sign agreement": summary["train_sign_agreement_after"],
                "sd(r − r')": summary["difference_std"],
                "right/wrong pairs %": 100 * float(np.mean(np.abs(d) >= RIGHT_WRONG)),
            }
        records.append(record)
    return pd.DataFrame(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep_dir", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--prompts", type=Path, default=Path("runs/arithmetic/prompts.jsonl"))
    parser.add_argument("--configs", nargs="+", required=True)
    args = parser.parse_args()
    rows = {row["id"]: row for row in read_rows(args.prompts)}
    openings = {row["instruction"] for row in rows.values() if row["split"] == "train"}
    heldout = [row for row in rows.values() if row["split"] == "test"]
    unseen = {row["id"] for row in heldout if row["instruction"] not in openings}
    unseen_sums = sum(" + " in rows[prompt_id]["instruction"] for prompt_id in unseen)
    print(
        f"held-out rows: {len(heldout)}; {len(unseen)} of them open with a turn-1 question no training row opens "
        f"({unseen_sums} sums, {len(unseen) - unseen_sums} products)\n"
    )
    last_policies = {}  # config → per-row correctness of its π_3
    for name in args.configs:
        run = args.sweep_dir / name
        if not (run / "eval" / JUDGE_FOLDER / "win_rates.csv").is_file():
            print(f"## {name}: not evaluated yet\n")
            continue
        last = str(run / f"iteration_{ITERATIONS - 1}" / "policy")
        last_policies[name] = correctness(run, ["smollm2-135m-instruct", last], rows)[last]
        table = config_table(run, rows, unseen).astype(object).fillna("–")
        for column, digits in (("val. sign agreement", 2), ("train sign agreement", 2), ("sd(r − r')", 2)):
            table[column] = [f"{v:.{digits}f}" if isinstance(v, float) else v for v in table[column]]
        for column in ("accuracy h=1", "accuracy, unseen openings", "reply tokens", "right/wrong pairs %"):
            table[column] = [f"{v:.1f}" if isinstance(v, float) else v for v in table[column]]
        print(f"## {name}\n\n{markdown_table(table)}\n")
    names = list(last_policies)
    for name in names[1:]:  # same held-out rows, so the difference is paired by row
        gain = (last_policies[name] - last_policies[names[0]]).dropna().to_numpy()
        low, high = paired_interval(gain)
        print(f"π_3 accuracy, {name} − {names[0]}: {100 * gain.mean():+.1f} points [{low:+.1f}, {high:+.1f}]")


if __name__ == "__main__":
    main()
