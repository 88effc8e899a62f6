"""A small REFUEL iteration and its evaluation with the real SmolLM2-135M-Instruct and real prompts; evaluate pieces."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.data import load_prompts, select_partition
from refuel.config import RefuelConfig
from refuel.evaluation.evaluate import EvaluateConfig, evaluate
from refuel.storage import read_rows
from refuel.training.iterations import run

HOLDOUT = 8
PAIRS = 4
# Budget: GSM8K prompts of at most 100 chat-template tokens (143 of the 2000 rows) keep every sequence short; with
# the default 384 this test takes minutes. Training stays fp32 (mixed_precision "no"): accelerate's process-wide
# AcceleratorState cannot switch to bf16 after the trainer tests created an fp32 Accelerator in the same session.
MAX_PROMPT_TOKENS = 100


def _config(output_dir: Path, shared_prompts: Path) -> RefuelConfig:
    """The brief's small run: 4 reset points, H ≤ 2, 24-token replies, 8 held-out prompts."""
    return RefuelConfig(
        output_dir=str(output_dir),
        prompts=str(shared_prompts),
        pairs_per_iteration=PAIRS,
        max_horizon=2,
        max_new_tokens=24,
        holdout=HOLDOUT,
        per_device_batch_size=2,
        gradient_accumulation_steps=1,
        validation_fraction=0.25,
        learning_rate=1e-4,
        generation_batch_size=4,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )


@pytest.mark.slow
def test_refuel_iteration_then_evaluation(tmp_path: Path, shared_prompts: Path, smollm2_path: str) -> None:
    """run() collects, trains and saves π_1 (resumable); evaluate() judges it per turn on held-out prompts."""
    config = _config(tmp_path / "run", shared_prompts)
    checkpoint = Path(run(config))
    iteration_dir = tmp_path / "run" / "iteration_0"
    assert checkpoint == iteration_dir / "policy"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pairs_per_iteration"] == PAIRS

    # pairs.jsonl: token ids, reply masks and π_t log-probs for every kept pair
    rows = read_rows(iteration_dir / "pairs.jsonl")
    assert rows
    for row in rows:
        assert 1 <= row["turn"] <= row["horizon"] <= 2
        for suffix in ("", "_prime"):
            ids, mask = row["input_ids" + suffix], row["loss_mask" + suffix]
            assert len(ids) == len(mask)
            assert ids[: len(row["prompt_token_ids"])] == row["prompt_token_ids"]
            assert sum(mask) == len(row["token_ids" + suffix]) >= 1
            assert ids[len(ids) - sum(mask) :] == row["token_ids" + suffix]
            assert math.isfinite(row["logp_t" + suffix]) and row["logp_t" + suffix] < 0
            assert math.isfinite(row["reward" + suffix])

    # metrics.json: drops by reason, validation before/after, the step log
    metrics = json.loads((iteration_dir / "metrics.json").read_text())
    assert metrics["pairs"] == len(rows)
    assert metrics["pairs"] + sum(metrics["dropped"].values()) == PAIRS
    assert metrics["train_pairs"] + metrics["validation_pairs"] == len(rows)
    for key in ("validation_before", "validation_after"):
        assert set(metrics[key]) == {"loss", "sign_agreement"}
    if metrics["validation_pairs"]:
        assert math.isfinite(metrics["validation_before"]["loss"]) and math.isfinite(
            metrics["validation_after"]["loss"]
        )
    assert len(metrics["steps"]) == math.ceil(metrics["train_pairs"] / 2)

    # π_1 differs from π_0
    trained = load_file(checkpoint / "model.safetensors")
    initial = load_file(Path(smollm2_path) / "model.safetensors")
    shared_names = trained.keys() & initial.keys()
    assert "model.embed_tokens.weight" in shared_names
    assert any(not torch.equal(trained[name].float(), initial[name].float()) for name in shared_names)
    assert all(trained[name].shape == initial[name].shape for name in shared_names)
    del trained, initial

    # a re-run resumes: same checkpoint, nothing retrained or rewritten
    stamps = {
        path: path.stat().st_mtime_ns for path in (checkpoint / "model.safetensors", iteration_dir / "metrics.json")
    }
    assert Path(run(config)) == checkpoint
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps

    # evaluation on held-out prompts
    evaluation = EvaluateConfig(
        candidates=[str(checkpoint)],
        output_dir=str(tmp_path / "eval"),
        prompts=str(shared_prompts),
        n_prompts=2,
        horizon=2,
        holdout=HOLDOUT,
        max_new_tokens=24,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )
    paths = evaluate(evaluation)
    rates = pd.read_csv(paths["csv"], dtype={"turn": str})
    assert paths["csv"] == tmp_path / "eval" / "reward-math" / "win_rates.csv"
    assert list(rates["method"].unique()) == ["REFUEL π_1"]  # labelled from the run's config.json and metrics.json
    assert list(rates["turn"]) == ["1", "2", "avg"]
    assert rates["win_rate"].between(0, 100).all()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    judgements = pd.read_csv(paths["judgements"], dtype={"prompt_id": str})
    assert len(judgements) == 2 * 2  # prompts × turns
    assert judgements["outcome"].dropna().isin([0.0, 0.5, 1.0]).all()

    # held-out prompts are never trained on
    evaluated_ids = set(judgements["prompt_id"])
    trained_ids = {row["prompt_id"] for row in rows}
    assert len(evaluated_ids) == 2
    assert evaluated_ids.isdisjoint(trained_ids)
    prompts, _ = load_prompts(
        shared_prompts,
        tasks=config.tasks,
        datasets=config.datasets,
        splits=config.splits,
        tokenizer=load_tokenizer(config.policy_model),
        max_prompt_tokens=config.max_prompt_tokens,
    )
    heldout_ids = {row.id for row in select_partition(prompts, HOLDOUT, "heldout")}
    assert len(heldout_ids) == HOLDOUT
    assert evaluated_ids <= heldout_ids
    assert trained_ids.isdisjoint(heldout_ids)


# --- evaluation pieces on small inputs (fast; judge and report pieces are in test_evaluate.py) ---


@pytest.mark.slow  # evaluate() end to end: dialogues of three policies, then judging
def test_evaluate_keeps_candidates_with_the_same_folder_name_apart(
    tmp_path: Path, tiny_model_path: str, shared_prompts: Path
) -> None:
    """Two different checkpoints both named iteration_0 (from two runs) get their own dialogues and win rates."""
    first = tmp_path / "run_a" / "iteration_0" / "policy"
    second = tmp_path / "run_b" / "iteration_0" / "policy"
    shutil.copytree(tiny_model_path, first)
    shutil.copytree(tiny_model_path, second)
    model = AutoModelForCausalLM.from_pretrained(second)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    model.save_pretrained(second)
    paths = evaluate(
        EvaluateConfig(
            candidates=[str(first), str(second)],
            baseline=tiny_model_path,
            user_model=tiny_model_path,
            output_dir=str(tmp_path / "eval"),
            prompts=str(shared_prompts),
            n_prompts=2,
            horizon=1,
            holdout=HOLDOUT,
            max_new_tokens=4,
            max_prompt_tokens=MAX_PROMPT_TOKENS,
        )
    )
    judgements = pd.read_csv(paths["judgements"])
    assert len(judgements) == 2 * 2  # candidates × prompts at h = 1
    assert len(list((tmp_path / "eval" / "dialogues").iterdir())) == 3  # baseline and both candidates
