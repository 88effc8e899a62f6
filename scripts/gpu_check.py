"""The GPU paths that CPU CI cannot run, on one CUDA GPU, offline, in a few minutes (see gpu_check.sh).

Steps (each prints ``PASS``/``FAIL``/``SKIP`` with its wall time; the exit status is 1 if any failed):

- ``loss``: the REFUEL and DPO losses on CUDA in bf16 equal their fp32 values (rtol 2e-2).
- ``trainer``: :class:`refuel.training.trainer.RefuelTrainer` on CUDA with ``mixed_precision: bf16`` and a
  random-initialised tiny Llama: the π_t log-ratio is exactly 0 before training (validation loss =
  η²·mean (r − r')²), 2 optimizer steps with finite losses move the weights, the saved folder reloads.
- ``collection``: REFUEL pair collection on the transformers backend on CUDA (no vLLM): policy and
  user are the tiny model, 4 reset points on 2 hand-written GSM8K-style prompts, pairs tokenised.
- ``fsdp`` / ``deepspeed_zero2`` / ``deepspeed_zero3``: one process under ``accelerate launch`` with the
  shipped ``configs/accelerate/*.yaml`` (bf16): accelerate must build that engine (the launch check of
  :mod:`refuel.training.distributed`), 2 REFUEL steps, the gathered full state dict saved and reloaded equal to
  the trained weights. DeepSpeed steps are skipped when ``deepspeed`` is not importable.

Without CUDA it stops at once with exit status 2 and says so. Usage: ``bash scripts/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from refuel.config import RefuelConfig

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the worktree's packages; make_pairs from the tests

from dialogsim.console import EPILOG, console_command  # noqa: E402 (the worktree's, from the path set above)

STEP_TIMEOUT_S = 150
PAIRS = 8


def require_cuda() -> None:
    """Exit with status 2 and a clear message when no CUDA device is visible."""
    if not torch.cuda.is_available():
        print(
            f"gpu_check: FAIL: no CUDA device is visible (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
            "Run this check on a machine with one NVIDIA GPU.",
            file=sys.stderr,
        )
        sys.exit(2)


def make_tiny_model(folder: Path, tokenizer_path: str) -> str:
    """Save a random-initialised 2-layer Llama (seed 0) with the tokenizer of ``tokenizer_path`` to ``folder``."""
    from doubles import tiny_llama_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer, tie_word_embeddings=True)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _config(output_dir: Path, per_device: int) -> RefuelConfig:
    """bf16, lr 1e-3 without warm-up, one optimizer step per ``per_device × processes`` pairs."""
    from refuel.config import RefuelConfig

    return RefuelConfig(
        output_dir=str(output_dir),
        learning_rate=1e-3,
        warmup_ratio=0.0,
        per_device_batch_size=per_device,
        effective_batch_size=per_device * int(os.environ.get("WORLD_SIZE", "1")),
        mixed_precision="bf16",
        seed=0,
    )


def train_and_reload(model_path: str, out: Path, per_device: int) -> dict:
    """2 bf16 REFUEL steps on the pairs of ``make_pairs``, saved and reloaded; returns what was checked."""
    from doubles import make_pairs
    from transformers import AutoModelForCausalLM

    from dialogsim.backends.transformers_backend import load_tokenizer
    from dialogsim.precision import training_dtype
    from refuel.training.trainer import RefuelTrainer

    tokenizer = load_tokenizer(model_path)
    rows = make_pairs(tokenizer, PAIRS + 2)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=training_dtype())
    initial = {name: tensor.detach().float().cpu().clone() for name, tensor in model.state_dict().items()}
    config = _config(out, per_device)
    trainer = RefuelTrainer(config, model, tokenizer, rows[:PAIRS], rows[PAIRS:])
    trainer.compute_logp_t()
    before = trainer.validate()
    gaps = torch.tensor([row["reward"] - row["reward_prime"] for row in rows[PAIRS:]])
    expected = (config.eta**2 * gaps**2).mean().item()  # log-ratio 0 at π = π_t
    log = trainer.train()
    trainer.save(out / "policy", tokenizer)
    result = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "device": str(trainer.accelerator.device),
        "validation_before": before.loss,
        "expected_before": expected,
        "losses": [entry["loss"] for entry in log],
    }
    if trainer.accelerator.is_main_process:
        saved = AutoModelForCausalLM.from_pretrained(out / "policy", dtype=training_dtype()).state_dict()
        result["moved"] = max((saved[name] - initial[name]).abs().max().item() for name in initial)
    assert abs(before.loss - expected) <= 1e-6 * max(1.0, expected), (before.loss, expected)
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(result["losses"]))), log
    assert result.get("moved", 1.0) > 0, "the saved weights equal π_t"
    return result


def step_loss(_: Path, __: str) -> dict:
    """REFUEL and DPO losses in bf16 on CUDA against fp32."""
    from refuel.training.loss import LossInputs, dpo_loss, refuel_loss

    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(64, generator=generator) * scale for scale in (30, 30, 30, 30, 1, 1)]
    results = {}
    for name, loss in (("refuel", refuel_loss), ("dpo", dpo_loss)):
        extra = (0.1,) if name == "dpo" else (1.0,)
        want = loss(LossInputs(*[v.double() for v in values]), *extra).item()
        got = loss(LossInputs(*[v.cuda().bfloat16() for v in values]), *extra)
        assert got.device.type == "cuda", got.device
        torch.testing.assert_close(got.float().item(), want, rtol=2e-2, atol=1e-3)
        results[name] = {"bf16": got.float().item(), "fp64": want}
    return results


def step_trainer(work: Path, model_path: str) -> dict:
    """RefuelTrainer in one process on CUDA, bf16."""
    result = train_and_reload(model_path, work / "trainer", per_device=4)
    assert result["device"].startswith("cuda"), result["device"]
    return result


def step_collection(_: Path, model_path: str) -> dict:
    """Pair collection without vLLM: policy and user on the transformers backend on CUDA."""
    from dialogsim.backends.transformers_backend import TransformersBackend
    from dialogsim.prompts import PromptRow
    from dialogsim.rewards.math_reward import MathAnswerReward
    from dialogsim.sampling import SamplingParams
    from dialogsim.simulator import DialogueSimulator, EpisodeConfig
    from dialogsim.user import UserSimulator
    from refuel.collection.collect import collect_pairs
    from refuel.pairs import tokenize_pairs

    policy = TransformersBackend(model_path, device="cuda")
    user_sampling = SamplingParams(temperature=0.01, max_new_tokens=8, repetition_penalty=1.2, stop=("?",))
    user = UserSimulator(TransformersBackend(model_path, device="cuda"), "student", sampling=user_sampling)
    prompts = [
        PromptRow(id=f"gpu-check-{i}", task="Math_CoT", dataset="gsm8k", instruction=q, reference=a, split="train")
        for i, (q, a) in enumerate([("Tom has 3 apples and buys 4 more. How many?", "7"), ("What is 6 times 7?", "42")])
    ]
    simulator = DialogueSimulator(prompts, user, MathAnswerReward(), EpisodeConfig(max_horizon=2), policy.tokenizer)
    collected = collect_pairs(simulator, policy, 4, SamplingParams(temperature=1.0, max_new_tokens=8), seed=0)
    rows, counts = tokenize_pairs(collected.pairs, policy.tokenizer)
    assert rows or collected.dropped, "no pairs and no drops"
    return {"pairs": len(rows), "dropped": dict(collected.dropped), "tokenization": dict(counts)}


def _launched_step(engine: str) -> Callable[[Path, str], dict]:
    """A step that runs ``fsdp-worker`` under ``accelerate launch --config_file configs/accelerate/<engine>.yaml``."""

    def step(work: Path, model_path: str) -> dict:
        if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            return {"skip": "deepspeed is not installed (set DEEPSPEED_WHEELS for gpu_check.sh)"}
        out = work / engine
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(REPO / "configs" / "accelerate" / f"{engine}.yaml"),
            "--num_processes", "1", "--main_process_port", "0",
            str(Path(__file__).resolve()), "worker", "--model", model_path, "--out", str(out),
        ]  # fmt: skip
        process = subprocess.run(command, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False)
        if process.returncode != 0:
            raise RuntimeError(f"{engine} launch failed:\n{process.stdout[-1500:]}\n{process.stderr[-4000:]}")
        result = json.loads((out / "result.json").read_text())
        want = "DistributedType.FSDP" if engine == "fsdp" else "DistributedType.DEEPSPEED"
        assert result["distributed_type"] == want, result
        return result

    return step


STEPS: dict[str, Callable[[Path, str], dict]] = {
    "loss": step_loss,
    "trainer": step_trainer,
    "collection": step_collection,
    "fsdp": _launched_step("fsdp"),
    "deepspeed_zero2": _launched_step("deepspeed_zero2"),
    "deepspeed_zero3": _launched_step("deepspeed_zero3"),
}


@console_command
def main(argv: list[str]) -> int:
    """Run the steps (``check``) or one launched process of the engine steps (``worker``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG
    )
    parser.add_argument("mode", choices=("check", "worker"))
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the local SmolLM2 of dialogsim.models)")
    parser.add_argument("--model", help="worker: the tiny model folder")
    parser.add_argument("--out", type=Path, help="worker: its output folder")
    parser.add_argument("--steps", default=",".join(STEPS), help="check: comma-separated subset of the steps")
    args = parser.parse_args(argv)
    require_cuda()
    if args.mode == "worker":
        result = train_and_reload(args.model, args.out, per_device=4)
        if int(os.environ.get("RANK", "0")) == 0:
            (args.out / "result.json").write_text(json.dumps(result))
        return 0
    if args.tokenizer is None:
        from dialogsim.models import resolve_model

        args.tokenizer = resolve_model("smollm2-135m-instruct")
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        work = Path(tmp)
        model_path = make_tiny_model(work / "tiny-llama", args.tokenizer)
        for name in args.steps.split(","):
            start = time.monotonic()
            try:
                result = STEPS[name](work, model_path)
                status = "SKIP" if "skip" in result else "PASS"
            except Exception as error:  # report every step, then fail
                result, status = {"error": f"{type(error).__name__}: {error}"}, "FAIL"
                failed.append(name)
            print(f"{status} {name} ({time.monotonic() - start:.1f} s): {json.dumps(result, default=str)}", flush=True)
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed or skipped'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
