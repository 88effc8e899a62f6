"""LoRA through peft: only adapters train, π_t is exact at the start, save merges, iteration t+1 starts from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from doubles import make_pairs
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

import refuel.training.iterations
from dialogsim.backends.transformers_backend import load_tokenizer
from refuel.config import RefuelConfig
from refuel.storage import write_json, write_rows
from refuel.training.trainer import RefuelTrainer

pytest.importorskip("peft", reason="LoRA needs peft: pip install 'dialogsim[lora]'")

ETA = 1.0
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_model_path)


def _config(output_dir: Path, **overrides: Any) -> RefuelConfig:
    """LoRA r 4 on all linear layers; 8 epochs of one 8-pair step at lr 1e-2 (fits the tiny model's pairs)."""
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "eta": ETA,
        "temperature": TEMPERATURE,
        "learning_rate": 1e-2,
        "epochs": 8,
        "per_device_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.0,
        "lora_r": 4,
        "lora_alpha": 8,
        "seed": 0,
    }
    return RefuelConfig(**(values | overrides))


def _probe_logits(model: torch.nn.Module, input_ids: list[int]) -> torch.Tensor:
    """Logits ``[1, T, V]`` of one sequence, in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids])).logits


def _load(folder: str | Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_only_adapters_train_and_the_start_is_pi_t(
    tiny_model_path: str, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Only lora_A/lora_B train; π_t log-probs equal the plain model's; the loss starts at η²(r − r')²."""
    rows = make_pairs(tokenizer, 8)
    plain = RefuelTrainer(
        _config(tmp_path, lora_r=0, pair_layout="separate"), _load(tiny_model_path), tokenizer, rows, []
    )
    expected = [(pair["logp_t"], pair["logp_t_prime"]) for pair in plain.compute_logp_t().train]
    trainer = RefuelTrainer(_config(tmp_path), _load(tiny_model_path), tokenizer, rows, rows)
    scored = trainer.compute_logp_t()
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable), trainable
    assert any("q_proj" in name for name in trainable) and any("down_proj" in name for name in trainable)
    total = sum(p.numel() for p in trainer.model.parameters())
    assert sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) < 0.1 * total
    got = [(pair["logp_t"], pair["logp_t_prime"]) for pair in scored.train]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-5)
    before = trainer.validate()
    assert before.loss == pytest.approx((4 * 1.0 + 4 * 2.25) / 8, rel=1e-6)  # r − r' = 1 for 4 pairs, −1.5 for 4


@pytest.mark.slow
def test_save_merges_the_adapters_into_a_plain_policy(
    tiny_model_path: str, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Training fits the pairs; the saved folder is a plain model with the adapted logits, unlike π_0."""
    rows = make_pairs(tokenizer, 8)
    trainer = RefuelTrainer(_config(tmp_path), _load(tiny_model_path), tokenizer, rows, rows)
    trainer.compute_logp_t()
    before = trainer.validate()
    trainer.train()
    after = trainer.validate()
    assert after.loss < 0.5 * before.loss, (before, after)
    probe = rows[1]["input_ids_prime"]
    adapted = _probe_logits(trainer.model, probe)
    folder = tmp_path / "iteration_0" / "policy"
    trainer.save(folder, tokenizer)
    assert (folder / "config.json").exists() and not (folder / "adapter_config.json").exists()
    assert type(trainer.model).__name__ == "LlamaForCausalLM"  # merged and unwrapped
    saved = _load(folder)
    assert not any("lora" in name for name in saved.state_dict())
    torch.testing.assert_close(_probe_logits(saved, probe), adapted, rtol=1e-4, atol=1e-5)
    assert (_probe_logits(saved, probe) - _probe_logits(_load(tiny_model_path), probe)).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="merged"):
        trainer.train()


@pytest.mark.slow
def test_iteration_1_starts_from_the_merged_iteration_0_policy(
    tiny_model_path: str, tokenizer: PreTrainedTokenizerBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """refuel.training.iterations.run, LoRA: iteration 1 collects with and trains from iteration_0/policy, never π_0.

    Collection is replaced by hand-made pairs (the seams: build_training_simulator, prepare_pairs); the
    trainer is wrapped to record the logits of the model each iteration starts from.
    """
    probe = make_pairs(tokenizer, 2)[1]["input_ids_prime"]
    collected_with: list[str] = []
    starts: list[torch.Tensor] = []

    def fake_prepare_pairs(config: RefuelConfig, simulator: Any, engine: Any, iteration: int, policy_path: str):
        collected_with.append(policy_path)  # the π_t that run() collects with
        iteration_dir = Path(config.output_dir) / f"iteration_{iteration}"
        write_rows(make_pairs(tokenizer, 8), iteration_dir / "pairs.jsonl")
        write_json({"iteration": iteration, "policy_in": policy_path}, iteration_dir / "collection.json")

    class RecordingTrainer(RefuelTrainer):
        def __init__(self, config: RefuelConfig, model: PreTrainedModel, *args: Any, **kwargs: Any) -> None:
            assert not hasattr(model, "peft_config"), "iteration must start from a plain (merged) model"
            starts.append(_probe_logits(model, probe))
            super().__init__(config, model, *args, **kwargs)

    monkeypatch.setattr(refuel.training.iterations, "build_training_simulator", lambda config, engine: None)
    monkeypatch.setattr(refuel.training.iterations, "prepare_pairs", fake_prepare_pairs)
    monkeypatch.setattr(refuel.training.iterations, "RefuelTrainer", RecordingTrainer)
    config = _config(tmp_path / "run", policy_model=tiny_model_path, iterations=2, epochs=3, validation_fraction=0.25)
    final = refuel.training.iterations.run(config)

    first, second = tmp_path / "run" / "iteration_0" / "policy", tmp_path / "run" / "iteration_1" / "policy"
    assert final == str(second)
    assert collected_with == [tiny_model_path, str(first)]
    assert json.loads((second.parent / "metrics.json").read_text())["policy_in"] == str(first)
    for folder in (first, second):
        assert (folder / "config.json").exists() and not (folder / "adapter_config.json").exists()
    pi_0, pi_1, pi_2 = (_probe_logits(_load(path), probe) for path in (tiny_model_path, first, second))
    torch.testing.assert_close(starts[0], pi_0)
    torch.testing.assert_close(starts[1], pi_1, rtol=1e-5, atol=1e-5)  # iteration 1 starts from π_1 ...
    assert (starts[1] - pi_0).abs().max() > 1e-3  # ... which differs from π_0
    assert (pi_2 - pi_1).abs().max() > 1e-3  # and iteration 1 trained further
