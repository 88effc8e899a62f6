"""Two CPU processes under ``accelerate launch`` (DDP or FSDP2, gloo) take the same REFUEL steps as one process.

The test launches this file as a real ``accelerate launch`` subprocess with the shipped
``configs/accelerate/ddp.yaml`` and ``configs/accelerate/fsdp.yaml`` (``--num_processes 2``,
``ACCELERATE_USE_CPU=true``), and compares with a single-process trainer at the same global batch of 4
pairs (2 optimizer steps over 8 pairs; 3 more pairs for validation, so that neither the π_t log-prob
shares nor the validation batches split evenly):

- ``ddp``: 2 processes × 2 pairs, no accumulation;
- ``ddp_accumulation``: 2 processes × 1 pair × 2 accumulation steps;
- ``ddp_lora``: 2 processes × 2 pairs with LoRA r 4 (only adapters train; merged on save);
- ``fsdp`` / ``fsdp_accumulation``: as ``ddp`` / ``ddp_accumulation`` with every parameter sharded by
  FSDP2 (``fully_shard`` per decoder layer and on the root, :mod:`refuel.training.distributed`: accelerate
  shards only on GPUs); gradients and weights are compared gathered in full;
- single process: 1 × 4 pairs (full fine-tuning, and LoRA for ``ddp_lora``).

The FSDP launch also records the refusals of launches that accelerate would silently run as something
else (FSDP1 and DeepSpeed on CPU processes, LoRA under FSDP), and one real ``refuel.training.iterations`` launch of
``fsdp.yaml`` on CPU without ``ACCELERATE_USE_CPU`` (accelerate: 2 unjoined processes) must stop before
collecting anything.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from dialogsim.backends.transformers_backend import load_tokenizer
from refuel.config import RefuelConfig
from refuel.training.distributed import LaunchMismatchError, RequestedLaunch, build_accelerator, check_launch
from refuel.training.trainer import RefuelTrainer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test here runs or reads a 2-process `accelerate launch`
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
PROCESSES = 2
GLOBAL_BATCH = 4
PAIRS = 8
VALIDATION_PAIRS = 3
# name: (per-device pairs, accumulation, LoRA rank) on 2 processes; the name's prefix is the accelerate config
SCENARIOS = {
    "ddp": (2, 1, 0),
    "ddp_accumulation": (1, 2, 0),
    "ddp_lora": (2, 1, 4),
    "fsdp": (2, 1, 0),
    "fsdp_accumulation": (1, 2, 0),
}
LAUNCH_TIMEOUT_S = 240
# requested launches that a 2-process CPU accelerator must refuse (checked in the FSDP launch)
REFUSED = {
    "fsdp1_on_cpu": RequestedLaunch(engine="FSDP", processes=2, fsdp_version=1, cpu=True),
    "deepspeed_on_cpu": RequestedLaunch(engine="DEEPSPEED", processes=2, fsdp_version=0, cpu=True),
}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``tensor``, gathered in full if FSDP2 sharded it (collective for DTensors)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


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
        checkpoint_every=0,  # no resumable checkpoints (refused under FSDP2 on CPU processes)
        seed=0,
    )


def _train(config: RefuelConfig, model_path: str, rows: list[dict[str, Any]], save_to: Path) -> dict[str, Any]:
    """Train π_0 on the first 8 rows, validate on the rest; return π_t log-probs, validation, per-step
    gradients and lr, the log and the weights after saving (with LoRA: merged)."""
    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer = RefuelTrainer(config, model, tokenizer, rows[:PAIRS], rows[PAIRS:])
    scored = trainer.compute_logp_t()
    inner = trainer.optimizer.optimizer  # the torch AdamW under accelerate's wrapper
    original_step = inner.step
    steps: list[dict[str, torch.Tensor]] = []

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        gradients = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
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
        "sharded": any(isinstance(parameter, DTensor) for parameter in model.parameters()),
        "logp_t": [(pair["logp_t"], pair["logp_t_prime"]) for pair in scored.train + scored.validation],
        "validation": [before.loss, before.sign_agreement, after.loss, after.sign_agreement],
        "steps": steps,
        "log": log,
        "weights": {name: _full(tensor) for name, tensor in model.state_dict().items()},
    }


def _refusals(model_path: str, rows: list[dict[str, Any]], out: Path) -> dict[str, str]:
    """The errors of LoRA under FSDP2 and of launches that this 2-process CPU accelerator does not run."""
    refusals = {}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="LoRA") as lora:
        RefuelTrainer(_config(out, 2, 1, 4), model, load_tokenizer(model_path), rows, [])
    refusals["lora_fsdp"] = str(lora.value)
    config = _config(out, 2, 1, 0)
    accelerator = build_accelerator(config)
    for name, requested in REFUSED.items():
        with pytest.raises(LaunchMismatchError) as refused:
            check_launch(accelerator, config, requested)
        refusals[name] = str(refused.value)
    return refusals


def worker(argv: Sequence[str]) -> None:
    """One process of the launch: the engine's scenarios in turn, results to ``<out>/<scenario>_rank<r>.pt``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for name, (per_device, accumulation, lora_r) in SCENARIOS.items():
        if name.split("_")[0] != args.engine:
            continue
        rows = json.loads(args.rows.read_text())  # fresh rows: the trainer writes the log-probs into them
        config = _config(args.out / name, per_device, accumulation, lora_r)
        result = _train(config, args.model, rows, save_to=args.out / name / "policy")
        torch.save(result, args.out / f"{name}_rank{result['rank']}.pt")
    if args.engine == "fsdp":
        refusals = _refusals(args.model, json.loads(args.rows.read_text()), args.out / "refused")
        (args.out / f"refusals_rank{int(os.environ['RANK'])}.json").write_text(json.dumps(refusals))


@pytest.fixture(scope="module")
def rows(tiny_model_path: str) -> list[dict[str, Any]]:
    from doubles import make_pairs

    return make_pairs(load_tokenizer(tiny_model_path), PAIRS + VALIDATION_PAIRS)


def _accelerate_launch(engine: str, target: list[str], cpu: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/<engine>.yaml --num_processes 2 <target>``.

    ``cpu``: set ``ACCELERATE_USE_CPU=true`` (CPU processes, gloo backend), as a CPU user must.
    """
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / f"{engine}.yaml"),
        "--num_processes",
        str(PROCESSES),
        "--main_process_port",
        "0",
        "--mixed_precision",
        "no",
        *target,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])  # this checkout
    env = env | {"ACCELERATE_USE_CPU": "true"} if cpu else {k: v for k, v in env.items() if k != "ACCELERATE_USE_CPU"}
    start = time.monotonic()
    process = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
    )
    print(f"accelerate launch of 2 processes ({engine}, {target[0]}): {time.monotonic() - start:.1f} s")
    return process


@pytest.fixture(scope="module")
def launched(
    tiny_model_path: str, rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """``launched("ddp")`` / ``launched("fsdp")``: the folder of that engine's 2-process launch of this file
    (launched once per module, on first use)."""
    folders: dict[str, Path] = {}

    def launch(engine: str) -> Path:
        if engine not in folders:
            out = tmp_path_factory.mktemp(engine)
            rows_file = out / "rows.json"
            rows_file.write_text(json.dumps(rows))
            script = [str(Path(__file__).resolve()), "--engine", engine, "--model", tiny_model_path]
            process = _accelerate_launch(engine, [*script, "--rows", str(rows_file), "--out", str(out)])
            assert process.returncode == 0, f"launch failed:\n{process.stdout[-2000:]}\n{process.stderr[-6000:]}"
            folders[engine] = out
        return folders[engine]

    return launch


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
def test_two_processes_step_like_one_process(scenario: str, launched: Callable[[str], Path], single: dict) -> None:
    """Same π_t log-probs, validation, gradients, lr, and weights after 2 steps as 1 process, same global batch."""
    folder = launched(scenario.split("_")[0])
    ranks = [torch.load(folder / f"{scenario}_rank{rank}.pt", weights_only=False) for rank in range(PROCESSES)]
    assert [r["sharded"] for r in ranks] == [scenario.startswith("fsdp")] * PROCESSES  # FSDP2: DTensor parameters
    lora_r = SCENARIOS[scenario][2]
    single = single[lora_r]
    trained = set(single["steps"][0]) - {"lr"}
    assert trained and all("lora_" in name for name in trained) == bool(lora_r)  # LoRA: only adapters step
    assert not any("lora" in name for name in ranks[0]["weights"])  # LoRA: merged into plain weights on save
    assert [r["processes"] for r in ranks] == [PROCESSES] * PROCESSES
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" for r in ranks), ranks[0]["distributed_type"]
    assert single["processes"] == 1
    for result in ranks:
        torch.testing.assert_close(torch.tensor(result["logp_t"]), torch.tensor(single["logp_t"]), rtol=0, atol=1e-5)
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


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_main_process_saves_one_loadable_folder(scenario: str, launched: Callable[[str], Path]) -> None:
    """The launch wrote each scenario's policy once (no staging folders left), equal to the trained weights
    (FSDP2: the full state dict gathered from the shards)."""
    out = launched(scenario.split("_")[0])
    folder = out / scenario / "policy"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["policy"]
    assert not (folder / "adapter_config.json").exists()
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    trained = torch.load(out / f"{scenario}_rank0.pt", weights_only=False)["weights"]
    assert saved.keys() == trained.keys()
    for name, weight in trained.items():
        torch.testing.assert_close(saved[name], weight, rtol=0, atol=0, msg=name)


def test_fsdp_launch_refuses_what_it_cannot_run(launched: Callable[[str], Path]) -> None:
    """On 2 CPU processes (accelerate: MULTI_CPU), FSDP1, DeepSpeed and LoRA under FSDP2 stop with a named error."""
    out = launched("fsdp")
    for rank in range(PROCESSES):
        refusals = json.loads((out / f"refusals_rank{rank}.json").read_text())
        assert "LoRA (lora_r=4) is not supported with FSDP2 on 2 CPU processes" in refusals["lora_fsdp"]
        assert refusals["fsdp1_on_cpu"].startswith(
            "the launch asked for FSDP1 on 2 CPU processes but accelerate built MULTI_CPU on 2 process(es): "
            "on CPU processes accelerate runs DDP and ignores the FSDP section"
        )
        assert refusals["deepspeed_on_cpu"].startswith(
            "the launch asked for DEEPSPEED on 2 CPU processes but accelerate built MULTI_CPU on 2 process(es): "
            "accelerate skips DeepSpeed on CPU processes"
        )


def test_unjoined_launch_stops_before_collection(tmp_path: Path) -> None:
    """``refuel.training.iterations`` under fsdp.yaml on CPU without ACCELERATE_USE_CPU: accelerate leaves the
    2 processes unjoined (DistributedType.NO, 1 process each); the run stops before writing or collecting anything."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU, accelerate joins the processes")
    run_dir = tmp_path / "run"
    process = _accelerate_launch("fsdp", ["-m", "refuel.training.iterations", "--output_dir", str(run_dir)], cpu=False)
    assert process.returncode != 0
    assert (  # a refused combination: one line per process (dialogsim.console)
        "error: the launch asked for FSDP2 on 2 processes but accelerate built NO on 1 process(es): "
        "no GPU is visible and ACCELERATE_USE_CPU is not true"
    ) in process.stderr, process.stderr[-4000:]
    assert not run_dir.exists()  # not even config.json: nothing collected


if __name__ == "__main__":
    worker(sys.argv[1:])
