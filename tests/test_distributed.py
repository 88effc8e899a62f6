"""Two CPU processes under ``accelerate launch`` (DDP, gloo) take the same REFUEL steps as one process.

The test launches this file as a real ``accelerate launch`` subprocess with the shipped
``configs/accelerate/ddp.yaml`` (``--num_processes 2``, ``ACCELERATE_USE_CPU=true``), and compares with a
single-process trainer at the same global batch of 4 pairs (2 optimizer steps over 8 pairs; 3 more
pairs for validation, so that neither the π_t log-prob shares nor the validation batches split evenly):

- ``ddp``: 2 processes × 2 pairs, no accumulation;
- ``ddp_accumulation``: 2 processes × 1 pair × 2 accumulation steps;
- ``ddp_lora``: 2 processes × 2 pairs with LoRA r 4 (only adapters train; merged on save);
- single process: 1 × 4 pairs (full fine-tuning, and LoRA for ``ddp_lora``).

Compared: the π_t log-probs (computed sharded and all-gathered), validation before and after
training (gathered from both processes), the gradients the optimizer steps with (they catch a
loss-normalisation error, which AdamW's first steps hide: they are nearly invariant to the gradient's
scale), the learning rates, the weights after both steps and the saved folder.
Tolerances (fp32): log-probs 1e-5 nats, gradients rtol 1e-4 / atol 1e-6, weights atol 1e-5 (1 % of
one lr-1e-3 step); both processes' weights are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from dialogsim.backends.transformers_backend import load_tokenizer
from refuel.config import RefuelConfig
from refuel.trainer import RefuelTrainer

REPO = Path(__file__).resolve().parents[1]
DDP_CONFIG = REPO / "configs" / "accelerate" / "ddp.yaml"
PROCESSES = 2
GLOBAL_BATCH = 4
PAIRS = 8
VALIDATION_PAIRS = 3
# name: (per-device pairs, accumulation, LoRA rank) on 2 processes
SCENARIOS = {"ddp": (2, 1, 0), "ddp_accumulation": (1, 2, 0), "ddp_lora": (2, 1, 4)}
LAUNCH_TIMEOUT_S = 240


def _config(output_dir: Path, per_device: int, accumulation: int, lora_r: int) -> RefuelConfig:
    """lr 1e-3 without warm-up, so both steps move the weights; the cosine halves the lr at step 2."""
    return RefuelConfig(
        output_dir=str(output_dir),
        eta=1.0,
        temperature=0.8,
        learning_rate=1e-3,
        epochs=1,
        warmup_ratio=0.0,
        per_device_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=GLOBAL_BATCH,
        lora_r=lora_r,
        seed=0,
    )


def _train(config: RefuelConfig, model_path: str, rows: list[dict[str, Any]], save_to: Path) -> dict[str, Any]:
    """Train π_0 on the first 8 rows, validate on the rest; return π_t log-probs, validation, per-step
    gradients and lr, the log and the weights after saving (with LoRA: merged)."""
    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer = RefuelTrainer(config, model, tokenizer, rows[:PAIRS], rows[PAIRS:])
    inner = trainer.optimizer.optimizer  # the torch AdamW under accelerate's wrapper
    original_step = inner.step
    steps: list[dict[str, torch.Tensor]] = []

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        steps.append(gradients | {"lr": torch.tensor(inner.param_groups[0]["lr"])})
        return original_step(*args, **kwargs)

    inner.step = recording_step
    before = trainer.validate()
    log = trainer.train()
    after = trainer.validate()
    trainer.save(save_to, tokenizer)
    return {
        "rank": trainer.accelerator.process_index,
        "processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "reference": [(row["ref_logp"], row["ref_logp_prime"]) for row in rows],
        "validation": [before.loss, before.sign_agreement, after.loss, after.sign_agreement],
        "steps": steps,
        "log": log,
        "weights": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
    }


def worker(argv: Sequence[str]) -> None:
    """One process of the launch: every scenario in turn, results to ``<out>/<scenario>_rank<r>.pt``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for name, (per_device, accumulation, lora_r) in SCENARIOS.items():
        rows = json.loads(args.rows.read_text())  # fresh rows: the trainer writes the log-probs into them
        config = _config(args.out / name, per_device, accumulation, lora_r)
        result = _train(config, args.model, rows, save_to=args.out / name / "policy")
        torch.save(result, args.out / f"{name}_rank{result['rank']}.pt")


@pytest.fixture(scope="module")
def rows(tiny_model_path: str) -> list[dict[str, Any]]:
    from test_trainer import make_pairs

    return make_pairs(load_tokenizer(tiny_model_path), PAIRS + VALIDATION_PAIRS)


@pytest.fixture(scope="module")
def launched(tiny_model_path: str, rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run ``accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 <this file>``."""
    out = tmp_path_factory.mktemp("ddp")
    rows_file = out / "rows.json"
    rows_file.write_text(json.dumps(rows))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(DDP_CONFIG),
        "--num_processes",
        str(PROCESSES),
        "--main_process_port",
        "0",
        "--mixed_precision",
        "no",
        str(Path(__file__).resolve()),
        "--model",
        tiny_model_path,
        "--rows",
        str(rows_file),
        "--out",
        str(out),
    ]
    env = os.environ | {
        "ACCELERATE_USE_CPU": "true",  # DDP on CPU processes with the gloo backend
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    start = time.monotonic()
    process = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
    )
    assert process.returncode == 0, f"accelerate launch failed:\n{process.stdout[-2000:]}\n{process.stderr[-6000:]}"
    print(f"accelerate launch of 2 processes: {time.monotonic() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def single(tiny_model_path: str, rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The single-process references, in this process: 1 process × 4 pairs, by LoRA rank."""
    references = {}
    for lora_r in sorted({lora_r for _, _, lora_r in SCENARIOS.values()}):
        out = tmp_path_factory.mktemp(f"single_lora{lora_r}")
        config = _config(out, GLOBAL_BATCH, 1, lora_r)
        references[lora_r] = _train(config, tiny_model_path, json.loads(json.dumps(rows)), save_to=out / "policy")
    return references


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden:UserWarning")
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_two_processes_step_like_one_process(scenario: str, launched: Path, single: dict) -> None:
    """Same π_t log-probs, validation, gradients, lr, and weights after 2 steps as 1 process, same global batch."""
    ranks = [torch.load(launched / f"{scenario}_rank{rank}.pt", weights_only=False) for rank in range(PROCESSES)]
    lora_r = SCENARIOS[scenario][2]
    single = single[lora_r]
    trained = set(single["steps"][0]) - {"lr"}
    assert trained and all("lora_" in name for name in trained) == bool(lora_r)  # LoRA: only adapters step
    assert not any("lora" in name for name in ranks[0]["weights"])  # LoRA: merged into plain weights on save
    assert [r["processes"] for r in ranks] == [PROCESSES] * PROCESSES
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" for r in ranks), ranks[0]["distributed_type"]
    assert single["processes"] == 1
    for result in ranks:
        torch.testing.assert_close(
            torch.tensor(result["reference"]), torch.tensor(single["reference"]), rtol=0, atol=1e-5
        )
        assert result["validation"] == pytest.approx(single["validation"], rel=1e-4)
        assert len(result["steps"]) == len(single["steps"]) == PAIRS // GLOBAL_BATCH
        for step, (got, want) in enumerate(zip(result["steps"], single["steps"], strict=True), start=1):
            assert got.keys() == want.keys()
            assert got["lr"].item() == pytest.approx(want["lr"].item(), rel=1e-12), step
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=f"step {step} {name}")
        assert [entry["lr"] for entry in result["log"]] == pytest.approx([entry["lr"] for entry in single["log"]])
        assert [entry["loss"] for entry in result["log"]] == pytest.approx(
            [entry["loss"] for entry in single["log"]], rel=1e-4
        )
        for name, weight in single["weights"].items():
            torch.testing.assert_close(result["weights"][name], weight, rtol=0, atol=1e-5, msg=name)
    assert [s["lr"].item() for s in single["steps"]] == pytest.approx([1e-3, 5e-4])  # cosine over 2 steps
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), f"replicas diverged at {name}"


def test_main_process_saves_one_loadable_folder(launched: Path) -> None:
    """The launch wrote each scenario's policy once (no staging folders left), equal to the trained weights."""
    for scenario in SCENARIOS:
        folder = launched / scenario / "policy"
        assert sorted(p.name for p in folder.parent.iterdir()) == ["policy"]
        assert not (folder / "adapter_config.json").exists()
        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
        trained = torch.load(launched / f"{scenario}_rank0.pt", weights_only=False)["weights"]
        for name, weight in trained.items():
            torch.testing.assert_close(saved[name], weight, rtol=0, atol=0, msg=name)


if __name__ == "__main__":
    worker(sys.argv[1:])
