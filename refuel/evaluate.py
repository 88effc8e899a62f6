"""``refuel-evaluate``: per-turn win rates of candidate policies against a baseline policy.

For each held-out prompt, every policy talks to the same simulated user (same seeds) for H turns.
The judge (on CPU: the reward model; ties count ½) compares the candidate's and the baseline's
dialogues truncated at each turn h; the win rate per turn h with a bootstrap 95 % interval is
printed in the paper's layout (rows = methods, columns = h=1..H, avg), saved to CSV and plotted.
Dialogues are cached under ``<output_dir>/dialogues`` so re-judging does not regenerate them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dialogsim.backends.transformers_backend import TransformersBackend
from dialogsim.dialogue import fingerprint
from dialogsim.messages import truncate_to_turn
from dialogsim.models import resolve_model
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator
from envs.build import build_simulator_from
from refuel.cli import parse_config
from refuel.rollout import run_policy
from refuel.storage import read_rows, write_rows
from refuel.winrate import pairwise_outcome, paper_table, per_turn_win_rates, save_report

logger = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """Settings of a per-turn win-rate evaluation; the ``refuel-evaluate`` flags are generated from it."""

    candidates: list[str] = field(
        default_factory=lambda: ["runs/refuel/iteration_0/policy"], metadata={"help": "candidate policies"}
    )
    baseline: str = field(default="smollm2-135m-instruct", metadata={"help": "baseline policy (π_0)"})
    output_dir: str = field(default="runs/refuel/eval", metadata={"help": "where dialogues, CSV, PNG go"})
    prompts: str | None = field(default=None, metadata={"help": "prompt file or hub id; default: shared file"})
    tasks: list[str] = field(default_factory=lambda: ["Math_CoT"], metadata={"help": "tasks to keep"})
    datasets: list[str] = field(default_factory=lambda: ["gsm8k"], metadata={"help": "source datasets to keep"})
    splits: list[str] = field(default_factory=lambda: ["train"], metadata={"help": "source splits to keep"})
    holdout: int = field(default=64, metadata={"help": "held-out prompts (same value as refuel-train's)"})
    n_prompts: int = field(default=16, metadata={"help": "held-out prompts evaluated (dialogues per policy)"})
    horizon: int = field(default=3, metadata={"help": "H: turns per evaluation dialogue (paper: 5)"})
    max_new_tokens: int = field(default=160, metadata={"help": "cap on policy reply tokens"})
    temperature: float = field(default=0.8, metadata={"help": "policy sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "policy nucleus sampling mass"})
    user_model: str = field(default="smollm2-135m-instruct", metadata={"help": "simulated-user model"})
    user_template: str = field(default="student", metadata={"help": "'student' or 'paper'"})
    reward: str = field(default="math", metadata={"help": "judge: reward model spec ('math' or RM id/path)"})
    max_dialogue_tokens: int = field(default=2048, metadata={"help": "token budget per dialogue"})
    max_prompt_tokens: int = field(default=384, metadata={"help": "drop prompts longer than this (tokens)"})
    seed: int = field(default=0, metadata={"help": "seed of prompt choice, user and policy sampling"})


def method_name(policy: str, parts: int = 1) -> str:
    """Readable label: ``runs/x/iteration_0/policy`` → ``iteration_0`` (``parts=2``: ``x/iteration_0``)."""
    path = Path(policy)
    path = path.parent if path.name == "policy" else path
    return "/".join(path.parts[-parts:])


def method_names(policies: list[str]) -> dict[str, str]:
    """A distinct label per policy, using more path parts until the labels differ.

    Raises:
        ValueError: the same policy is listed twice.
    """
    if len(set(policies)) != len(policies):
        raise ValueError(f"each policy may be evaluated once; got duplicates in {policies}")
    longest = max(len(Path(policy).parts) for policy in policies)
    for parts in range(1, longest + 1):
        names = {policy: method_name(policy, parts) for policy in policies}
        if len(set(names.values())) == len(policies):
            return names
    return {policy: policy for policy in policies}


def policy_identity(policy: str) -> dict[str, Any]:
    """What identifies a policy's weights for the dialogue cache: resolved path, weight files' sizes and times."""
    folder = Path(resolve_model(policy))
    if not folder.is_dir():
        return {"name": policy}
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return {"path": str(folder.resolve()), "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def generate_dialogues(
    config: EvaluateConfig, simulator: DialogueSimulator, policy: str, cache: Path
) -> list[dict[str, Any]]:
    """Dialogues of one policy on the held-out prompts (cached in ``cache``).

    Every policy starts from identical states (same prompt, horizon and user RNG per prompt) and the
    same policy-sampling seed sequence, so the only difference between methods is the policy.
    """
    if cache.exists():
        logger.info("reusing cached dialogues %s", cache)
        return read_rows(cache)
    states = [
        simulator.new_state(
            np.random.default_rng([config.seed, index]), {"prompt_id": prompt_id, "horizon": config.horizon}
        )
        for index, prompt_id in enumerate(simulator.prompt_ids)
    ]
    sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens)
    run_policy(
        simulator, TransformersBackend(resolve_model(policy)), states, sampling, np.random.default_rng(config.seed)
    )
    rows = [
        {"prompt_id": s.prompt_id, "horizon": s.horizon, "truncated": s.truncated, "messages": s.messages}
        for s in states
    ]
    write_rows(rows, cache)
    return rows


def score_per_turn(simulator: DialogueSimulator, dialogues: list[dict[str, Any]], horizon: int) -> pd.DataFrame:
    """Reward of each dialogue truncated at each turn h = 1..H (NaN where the dialogue ended before h).

    Returns:
        Columns ``prompt_id``, ``turn``, ``score``; one batched reward call.
    """
    keys, scored, texts, rows = [], [], [], []
    for dialogue in dialogues:
        replies = sum(message["role"] == "assistant" for message in dialogue["messages"])
        for turn in range(1, horizon + 1):
            keys.append((dialogue["prompt_id"], turn))
            scored.append(turn <= replies)
            if scored[-1]:
                texts.append(truncate_to_turn(dialogue["messages"], turn))
                rows.append(simulator.prompts[dialogue["prompt_id"]])
    scores = iter(simulator.reward.score(texts, rows))
    values = [next(scores) if was_scored else float("nan") for was_scored in scored]
    return pd.DataFrame({"prompt_id": [k[0] for k in keys], "turn": [k[1] for k in keys], "score": values})


def judge(candidate: pd.DataFrame, baseline: pd.DataFrame, method: str) -> pd.DataFrame:
    """Per (prompt, turn) outcome of candidate vs baseline: 1 win, 0 loss, ½ tie, NaN invalid."""
    merged = candidate.merge(baseline, on=["prompt_id", "turn"], suffixes=("_candidate", "_baseline"))
    merged["outcome"] = [
        pairwise_outcome(c, b) for c, b in zip(merged["score_candidate"], merged["score_baseline"], strict=True)
    ]
    merged["method"] = method
    return merged[["method", "prompt_id", "turn", "outcome", "score_candidate", "score_baseline"]]


def evaluate(config: EvaluateConfig) -> dict[str, Path]:
    """Generate (or reuse) dialogues, judge every turn, print the table; returns the report paths."""
    simulator = build_simulator_from(
        config,
        partition="heldout",
        limit=config.n_prompts,
        policy_model=config.baseline,
        max_horizon=config.horizon,
        horizon=config.horizon,
    )
    out = Path(config.output_dir)
    generation_key = fingerprint({k: v for k, v in asdict(config).items() if k not in ("candidates", "output_dir")})
    names = method_names([config.baseline, *config.candidates])
    scores = {}
    for policy, name in names.items():
        key = fingerprint({"generation": generation_key, "policy": policy_identity(policy)})
        dialogues = generate_dialogues(config, simulator, policy, out / "dialogues" / f"{name}-{key}.jsonl")
        scores[policy] = score_per_turn(simulator, dialogues, config.horizon)
    judgements = pd.concat(
        [judge(scores[policy], scores[config.baseline], names[policy]) for policy in config.candidates]
    )
    judgements.to_csv(out / "judgements.csv", index=False)
    rates = per_turn_win_rates(judgements[["method", "prompt_id", "turn", "outcome"]], seed=config.seed)
    print(f"win rate (%) vs {names[config.baseline]}, judge: reward '{config.reward}', ties = 1/2")
    print(paper_table(rates).to_string())
    paths = save_report(rates, out, title=f"per-turn win rate vs {names[config.baseline]}")
    paths["judgements"] = out / "judgements.csv"
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``refuel-evaluate`` / ``python -m refuel.evaluate``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    evaluate(parse_config(EvaluateConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
