"""RefuelTrainer on hand-made tokenised pairs with a tiny model: validation, fitting, schedule, saving."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from doubles import make_pairs
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dialogsim.backends.transformers_backend import load_tokenizer
from refuel.config import RefuelConfig
from refuel.training.layout import PairBatch
from refuel.training.trainer import NonFiniteTrainingError, RefuelTrainer, ValidationMetrics, save_pretrained_atomic

ETA = 1.0
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer and chat template (from the tiny model's folder)."""
    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def load_model(tiny_model_path: str) -> Callable[[], PreTrainedModel]:
    """A fresh fp32 copy of the tiny model (π_0) on every call; trainers train their model in place."""
    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


def _config(tmp_path: Path, **overrides: Any) -> RefuelConfig:
    """The fitting test's configuration (η 1, lr 1e-2, 10 epochs of one 8-pair step, 30 % warm-up), overridable."""
    values: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "eta": ETA,
        "temperature": TEMPERATURE,
        "learning_rate": 1e-2,
        "epochs": 10,
        "per_device_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.3,
        "seed": 0,
    }
    return RefuelConfig(**(values | overrides))


def _snapshot(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A detached copy of the model's weights."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@dataclass
class Fitted:
    """A trainer after 10 epochs (one step each) on 8 pairs, with what was measured around training."""

    trainer: RefuelTrainer
    model: PreTrainedModel
    rows: list[dict[str, Any]]
    initial: dict[str, torch.Tensor]
    before: ValidationMetrics
    log: list[dict[str, float]]
    after: ValidationMetrics


@pytest.fixture(scope="module")
def fitted(
    tokenizer: PreTrainedTokenizerBase,
    load_model: Callable[[], PreTrainedModel],
    tmp_path_factory: pytest.TempPathFactory,
) -> Fitted:
    """Validate on the training pairs, train, validate again."""
    config = _config(tmp_path_factory.mktemp("fit"))
    model = load_model()
    rows = make_pairs(tokenizer, 8)
    initial = _snapshot(model)
    trainer = RefuelTrainer(config, model, tokenizer, rows, rows)  # validate on the training pairs
    trainer.compute_logp_t()
    before = trainer.validate()
    log = trainer.train()
    return Fitted(trainer, model, rows, initial, before, log, trainer.validate())


def test_validation_before_training_is_the_reward_term_alone(fitted: Fitted) -> None:
    """With π = π_t the log-ratios vanish: loss = mean(η²(r − r')²) and sign agreement is 0 (all ties)."""
    expected = sum(ETA**2 * (row["reward"] - row["reward_prime"]) ** 2 for row in fitted.rows) / len(fitted.rows)
    assert expected == pytest.approx((4 * 1.0 + 4 * 2.25) / 8)  # r − r' = 1 for 4 pairs, −1.5 for 4
    assert fitted.before.loss == pytest.approx(expected, rel=1e-6)
    assert fitted.before.sign_agreement == 0.0


def test_training_fits_the_pairs(fitted: Fitted) -> None:
    """10 epochs at lr 1e-2 cut the training-pair REFUEL loss below half and change the weights."""
    assert fitted.after.loss < 0.5 * fitted.before.loss, (fitted.before, fitted.after)
    assert fitted.after.sign_agreement > 0.5
    changed = [
        name for name, tensor in fitted.model.state_dict().items() if not torch.equal(tensor, fitted.initial[name])
    ]
    assert changed, "no weight changed"
    assert any("layers.0" in name for name in changed) and any("embed_tokens" in name for name in changed)


def test_schedule_is_linear_warmup_then_cosine(fitted: Fitted) -> None:
    """The logged lr follows linear warm-up over ceil(30 % of steps), then cosine decay to 0."""
    steps = 10 * math.ceil(1 / 1)  # epochs × (8 pairs / 8 per micro-batch) / accumulation 1
    assert fitted.trainer.total_steps == steps == len(fitted.log)
    warmup = math.ceil(0.3 * steps)
    assert warmup == 3
    lrs = [entry["lr"] for entry in fitted.log]
    for step, lr in enumerate(lrs, start=1):  # logged after the scheduler step: the lr of the next step
        factor = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        assert lr == pytest.approx(1e-2 * factor, abs=1e-9), step
    assert lrs[:warmup] == sorted(lrs[:warmup]) and max(lrs) == pytest.approx(1e-2)
    assert lrs[warmup - 1 :] == sorted(lrs[warmup - 1 :], reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(math.isfinite(entry["loss"]) for entry in fitted.log)


def test_save_pretrained_atomic_writes_a_loadable_folder(
    fitted: Fitted, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """The saved folder reloads to the trained model's logits, replaces an old folder, leaves no staging dirs."""
    folder = tmp_path / "iteration_0" / "policy"
    folder.mkdir(parents=True)
    (folder / "stale.txt").write_text("from an older run")
    fitted.trainer.save(folder, tokenizer)
    assert sorted(path.name for path in folder.parent.iterdir()) == ["policy"]  # no staging folder left
    assert not (folder / "stale.txt").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fitted.model.eval()
    input_ids = torch.tensor([fitted.rows[0]["input_ids_prime"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, fitted.model(input_ids=input_ids).logits)
        assert not torch.equal(reloaded.model.embed_tokens.weight, fitted.initial["model.embed_tokens.weight"])
    assert load_tokenizer(str(folder)).chat_template == tokenizer.chat_template
    # a second atomic save over the existing folder works and still leaves only the folder
    save_pretrained_atomic(reloaded, tokenizer, folder)
    assert sorted(path.name for path in folder.parent.iterdir()) == ["policy"]
    assert (folder / "config.json").exists()


def _one_step(
    config: RefuelConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train one epoch; return the gradients and lr the optimizer stepped with, the weights after, and the log."""
    trainer = RefuelTrainer(config, model, tokenizer, rows, [])
    trainer.compute_logp_t()
    stepped: list[dict[str, torch.Tensor]] = []
    inner = trainer.optimizer.optimizer  # the torch AdamW under accelerate's wrapper
    original_step = inner.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        stepped.append(gradients | {"lr": torch.tensor(inner.param_groups[0]["lr"])})
        return original_step(*args, **kwargs)

    inner.step = recording_step
    log = trainer.train()
    assert len(stepped) == 1, f"expected one optimizer step, got {len(stepped)}"
    return stepped[0], _snapshot(model), log


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden:UserWarning")
def test_gradient_accumulation_matches_one_large_batch(
    tokenizer: PreTrainedTokenizerBase, load_model: Callable[[], PreTrainedModel], tmp_path: Path
) -> None:
    """2 micro-batches of 2 pairs with accumulation 2 step with the gradient and weights of 1 batch of 4."""
    model_t = load_model()
    rows = make_pairs(tokenizer, 4)
    initial = _snapshot(model_t)
    common = {"epochs": 1, "learning_rate": 1e-3, "warmup_ratio": 0.0}
    accumulated = _one_step(
        _config(tmp_path, per_device_batch_size=2, gradient_accumulation_steps=2, **common),
        load_model(),
        tokenizer,
        rows,
    )
    single = _one_step(
        _config(tmp_path, per_device_batch_size=4, gradient_accumulation_steps=1, **common),
        load_model(),
        tokenizer,
        rows,
    )
    assert accumulated[0].pop("lr").item() == single[0].pop("lr").item() == pytest.approx(1e-3)  # no warm-up
    assert accumulated[0].keys() == single[0].keys() and single[0]
    for name, gradient in single[0].items():
        torch.testing.assert_close(accumulated[0][name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    assert any(gradient.abs().max() > 0 for gradient in single[0].values())
    for name, weight in single[1].items():
        torch.testing.assert_close(accumulated[1][name], weight, rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(weight, initial[name]) for name, weight in single[1].items())  # a real step
    assert len(accumulated[2]) == len(single[2]) == 1


def test_single_step_iteration_updates_the_policy(
    tokenizer: PreTrainedTokenizerBase, load_model: Callable[[], PreTrainedModel], tmp_path: Path
) -> None:
    """An iteration of one optimizer step (4 pairs, batch 4, default warm-up 10 %) changes the weights; training
    needs π_t's log-probs first."""
    model = load_model()
    rows = make_pairs(tokenizer, 4)
    initial = _snapshot(model)
    config = _config(tmp_path, epochs=1, learning_rate=1e-3, per_device_batch_size=4, warmup_ratio=0.1)
    trainer = RefuelTrainer(config, model, tokenizer, rows, [])
    with pytest.raises(RuntimeError, match="compute_logp_t"):
        trainer.train()
    trainer.compute_logp_t()
    log = trainer.train()
    assert len(log) == 1
    assert any(not torch.equal(tensor, initial[name]) for name, tensor in model.state_dict().items())


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden:UserWarning")
def test_gradient_checkpointing_takes_the_same_step(
    tokenizer: PreTrainedTokenizerBase, load_model: Callable[[], PreTrainedModel], tmp_path: Path
) -> None:
    """Recomputing activations in the backward pass changes memory, not the gradient or the step."""
    rows = make_pairs(tokenizer, 4)
    common = {"epochs": 1, "learning_rate": 1e-3, "warmup_ratio": 0.0, "per_device_batch_size": 4}
    plain = _one_step(_config(tmp_path, **common), load_model(), tokenizer, rows)
    model = load_model()
    checkpointed = _one_step(_config(tmp_path, gradient_checkpointing=True, **common), model, tokenizer, rows)
    assert model.is_gradient_checkpointing and not model.config.use_cache
    assert checkpointed[0].keys() == plain[0].keys()
    for name, gradient in plain[0].items():
        torch.testing.assert_close(checkpointed[0][name], gradient, rtol=1e-5, atol=1e-7, msg=name)
    for name, weight in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], weight, rtol=0, atol=1e-6, msg=name)


def test_the_launch_must_match_the_configured_batch(
    tokenizer: PreTrainedTokenizerBase,
    load_model: Callable[[], PreTrainedModel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """effective_batch_size, accelerate's accumulation and the memory fields are checked before any work."""
    rows = make_pairs(tokenizer, 4)
    batch = {"per_device_batch_size": 2, "gradient_accumulation_steps": 2}
    with pytest.raises(
        ValueError, match=r"2 pairs per device × 2 accumulation × 1 processes = 4.*effective_batch_size is 8"
    ):
        RefuelTrainer(_config(tmp_path, effective_batch_size=8, **batch), load_model(), tokenizer, rows, [])
    trainer = RefuelTrainer(_config(tmp_path, effective_batch_size=4, **batch), load_model(), tokenizer, rows, [])
    assert trainer.effective_batch_size == 4 and trainer.total_steps == 10  # 10 epochs of one step
    with pytest.raises(ValueError, match="lora_r=-1"):
        RefuelTrainer(_config(tmp_path, lora_r=-1), load_model(), tokenizer, rows, [])
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")  # what `accelerate launch` may set
    with pytest.raises(ValueError, match="accelerate runs 3 accumulation steps"):
        RefuelTrainer(_config(tmp_path, **batch), load_model(), tokenizer, rows, [])


def test_dpo_lt_trains_with_the_dpo_loss(
    tokenizer: PreTrainedTokenizerBase, load_model: Callable[[], PreTrainedModel], tmp_path: Path
) -> None:
    """method dpo_lt: the step loss is DPO's, ln 2 at π = π_t (every pair has r ≠ r'), and it decreases."""
    rows = make_pairs(tokenizer, 8)
    config = _config(tmp_path, method="dpo_lt", dpo_beta=0.5, epochs=4, per_device_batch_size=8)
    trainer = RefuelTrainer(config, load_model(), tokenizer, rows, [])
    trainer.compute_logp_t()
    log = trainer.train()
    assert log[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert log[-1]["loss"] < log[0]["loss"]


class Crash(RuntimeError):
    """Stands for the process dying in the middle of training."""


@pytest.mark.slow
def test_resume_from_a_checkpoint_gives_the_uninterrupted_weights(
    tokenizer: PreTrainedTokenizerBase, load_model: Callable[[], PreTrainedModel], tmp_path: Path
) -> None:
    """Crash after 3 optimizer steps; a new trainer resumes from the checkpoint to the same weights and log."""
    config = _config(tmp_path, epochs=2, per_device_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3)
    rows = make_pairs(tokenizer, 10)  # 5 micro-batches per epoch: the odd one out syncs at the epoch's end
    uninterrupted = RefuelTrainer(config, load_model(), tokenizer, rows, [])
    uninterrupted.compute_logp_t()
    expected_log = uninterrupted.train()
    assert len(expected_log) == 6

    class CrashingTrainer(RefuelTrainer):
        def training_step(self, batch: PairBatch) -> torch.Tensor:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 7:  # mid-way into the 4th optimizer step, after the 3rd step's checkpoint
                raise Crash
            return super().training_step(batch)

    checkpoints = tmp_path / "checkpoints"
    crashing = CrashingTrainer(config, load_model(), tokenizer, rows, [])
    crashing.compute_logp_t()
    with pytest.raises(Crash):
        crashing.train(checkpoints, checkpoint_every=1)
    assert [path.name for path in checkpoints.iterdir()] == ["checkpoint-3"]
    resumed = RefuelTrainer(config, load_model(), tokenizer, rows, [])
    resumed.compute_logp_t()
    log = resumed.train(checkpoints, checkpoint_every=1)
    assert log == pytest.approx(expected_log, rel=1e-5)
    for (name, expected), actual in zip(
        uninterrupted.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_a_non_finite_loss_stops_training_before_the_step_and_nothing_non_finite_is_saved(
    tokenizer: PreTrainedTokenizerBase, load_model: Callable[[], PreTrainedModel], tmp_path: Path
) -> None:
    """Rewards so large that η(r − r') overflows: training stops at step 1 with the cause, weights untouched."""
    rows = make_pairs(tokenizer, 4)
    for row in rows:
        row["reward"] = 3e38  # finite in fp32; η · r is not
    model = load_model()
    initial = _snapshot(model)
    config = _config(tmp_path, epochs=1, per_device_batch_size=2)
    trainer = RefuelTrainer(config, model, tokenizer, rows, [])
    trainer.compute_logp_t()
    with pytest.raises(NonFiniteTrainingError, match=r"step 1 of 2: a micro-batch loss is not finite.*lower eta"):
        trainer.train(tmp_path / "checkpoints", checkpoint_every=1)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, initial[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteTrainingError, match="refusing to save"):
        trainer.save(tmp_path / "policy", tokenizer)
    assert not (tmp_path / "policy").exists()


def test_checkpoints_are_also_written_by_elapsed_time(
    tokenizer: PreTrainedTokenizerBase, load_model: Callable[[], PreTrainedModel], tmp_path: Path
) -> None:
    """checkpoint_every 0 with a time limit every step passes: a checkpoint after each step but the last."""
    config = _config(tmp_path, epochs=1, per_device_batch_size=2, learning_rate=1e-3)
    trainer = RefuelTrainer(config, load_model(), tokenizer, make_pairs(tokenizer, 8), [])
    trainer.compute_logp_t()
    checkpoints = tmp_path / "checkpoints"
    log = trainer.train(checkpoints, checkpoint_every=0, checkpoint_minutes=1e-9)
    assert len(log) == 4 and [path.name for path in checkpoints.iterdir()] == ["checkpoint-3"]
