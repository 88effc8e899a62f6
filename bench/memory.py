"""Peak memory and step time of a REFUEL step vs a plain SFT step on the same batch (full fine-tuning and LoRA).

    python -m bench.memory                      # SmolLM2-135M-Instruct, bf16 autocast, 3 runs per configuration
    python -m bench.memory --gradient_checkpointing --runs 5 --pairs 4

Both steps run through :class:`refuel.training.trainer.RefuelTrainer` (same ``accelerate`` setup, AdamW, clipping,
precision, gradient checkpointing and LoRA); they differ only in the objective:

- ``refuel``: the REFUEL least-squares loss on the relative log-ratio of the two replies (π_t log-probs
  computed once beforehand, as in training);
- ``sft``: next-token cross-entropy on the same reply tokens of the same 2B sequences, through the same
  masked log-prob code (so only the objective differs);
- ``sft_hf`` (optional): the same cross-entropy through transformers' ``labels=`` loss, which upcasts
  the logits of every position to fp32.

The batch is B pairs = 2B sequences of random token ids (prompt + reply; shapes, not content, set memory
and time). Each configuration runs in a fresh subprocess, ``--runs`` times, interleaved; every figure is
the median over runs.

Memory is the process's resident set size (RSS), the memory the OS actually holds for the process: with
torch on CPU, tensors live in glibc malloc / mmap memory, which neither ``tracemalloc`` (Python objects
only) nor a CUDA allocator counter sees. After one warm-up step (which allocates gradients and the
AdamW states), the RSS high-water mark is reset (Linux: writing ``5`` to ``/proc/self/clear_refs``) and
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is read after the measured steps, so the peak excludes
model loading. Columns:

- ``peak RSS``: high-water RSS during the measured steps (weights, gradients, optimizer states,
  activations, allocator slack), GiB;
- ``step increment``: peak RSS minus the RSS just before the measured steps (what the step itself
  allocates: activations, logits, gradients), GiB;
- ``step``: wall time of one optimizer step (forward + backward + AdamW), seconds;
- ``π_t pass``: for REFUEL, one no-grad log-prob pass over the same batch (done once per iteration,
  before the steps), seconds.

Numbers depend on the machine's load: the runs here shared 2 CPU cores with other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.runs import grouped_medians, machine_header, run_worker
from dialogsim.console import EPILOG, console_command
from dialogsim.models import check_model_name

GIB = 1024**3
OBJECTIVES = ("refuel", "sft", "sft_hf")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process; False where that is not possible (non-Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """High-water RSS of this process in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    """Current RSS of this process in bytes (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def synthetic_pairs(vocab_size: int, pairs: int, prompt_tokens: int, reply_tokens: int, seed: int) -> list[dict]:
    """``pairs`` tokenised pairs of random ids: a shared prompt, two replies, masks on the replies, rewards."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(pairs):
        prompt = torch.randint(100, vocab_size, (prompt_tokens,), generator=generator).tolist()
        replies = [torch.randint(100, vocab_size, (reply_tokens,), generator=generator).tolist() for _ in range(2)]
        mask = [0] * prompt_tokens + [1] * reply_tokens
        rewards = torch.rand(2, generator=generator).tolist()
        rows.append(
            {
                "input_ids": prompt + replies[0],
                "loss_mask": mask,
                "input_ids_prime": prompt + replies[1],
                "loss_mask_prime": mask,
                "reward": rewards[0],
                "reward_prime": rewards[1],
            }
        )
    return rows


def reply_labels(batch: Any) -> Any:
    """``[2B, T]`` labels of a ``separate``-layout :class:`~refuel.training.layout.PairBatch` for transformers'
    ``labels=`` loss: each reply token's id at its position, −100 elsewhere."""
    import torch

    labels = torch.full_like(batch.input_ids, -100)  # [2B, T]
    first = batch.input_ids.shape[1] - batch.logits_to_keep  # the position of the first kept logits
    real = batch.target_mask.bool()  # [2B, R]
    rows = torch.arange(labels.shape[0])[:, None].expand_as(real)
    labels[rows[real], (batch.predictor + first + 1)[real]] = batch.targets[real]  # a token sits after its predictor
    return labels


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this (fresh) process: build the trainer, warm up, measure ``args.steps`` steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from dialogsim.backends.transformers_backend import load_tokenizer
    from dialogsim.models import resolve_model
    from dialogsim.precision import training_dtype
    from refuel.config import RefuelConfig
    from refuel.training.layout import PairBatch, sequence_logprobs
    from refuel.training.trainer import RefuelTrainer

    class SFTTrainer(RefuelTrainer):
        """RefuelTrainer with next-token cross-entropy on the reply tokens of all 2B sequences."""

        def _loss(self, batch: PairBatch) -> torch.Tensor:
            tokens = batch.target_mask.sum()  # reply tokens predicted in the batch
            if args.objective == "sft_hf":
                loss = self.model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=reply_labels(batch)
                )
                return loss.loss
            return -sequence_logprobs(self.model, batch, 1.0).sum() / tokens  # [2B] summed

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=training_dtype())
    rows = synthetic_pairs(len(tokenizer), args.pairs, args.prompt_tokens, args.reply_tokens, seed=0)
    with tempfile.TemporaryDirectory() as output_dir:
        config = RefuelConfig(
            output_dir=output_dir,
            per_device_batch_size=args.pairs,
            gradient_accumulation_steps=1,
            epochs=1,
            learning_rate=1e-6,
            warmup_ratio=0.0,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            lora_r=args.lora_r,
            pair_layout="separate",  # both objectives on the same [2B, T] batches (SFT reads that layout)
        )
        trainer = (RefuelTrainer if args.objective == "refuel" else SFTTrainer)(config, model, tokenizer, rows, [])
        reference_pass_s = float("nan")  # SFT needs no π_t log-probs
        if args.objective == "refuel":
            start = time.perf_counter()
            trainer.compute_logp_t()
            reference_pass_s = time.perf_counter() - start
    _, batch = next(iter(trainer.train_loader))
    trainer.model.train()
    trainer.training_step(batch)  # warm-up: gradients and AdamW states now exist
    load_peak = peak_rss_bytes()
    before = current_rss_bytes()
    reset = reset_peak_rss()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.training_step(batch)
        times.append(time.perf_counter() - start)
    peak = peak_rss_bytes()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "objective": args.objective,
        "tuning": f"LoRA r={args.lora_r}" if args.lora_r else "full",
        "peak_gib": peak / GIB,
        "increment_gib": (peak - before) / GIB,
        "load_peak_gib": load_peak / GIB,
        "peak_reset": reset,
        "step_s": statistics.median(times),
        "reference_pass_s": reference_pass_s,
        "trainable_parameters": trainable,
        "sequences": 2 * args.pairs,
        "tokens_per_sequence": args.prompt_tokens + args.reply_tokens,
    }


def worker_command(args: argparse.Namespace, objective: str, lora_r: int) -> list[str]:
    command = [sys.executable, "-m", __spec__.name, "--worker", "--objective", objective]
    command += ["--lora_r", str(lora_r), "--model", args.model, "--pairs", str(args.pairs)]
    command += ["--prompt_tokens", str(args.prompt_tokens), "--reply_tokens", str(args.reply_tokens)]
    command += ["--steps", str(args.steps), "--threads", str(args.threads), "--mixed_precision", args.mixed_precision]
    return command + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the medians per (tuning, objective), with REFUEL / SFT ratios."""
    groups, median = grouped_medians(results, ("tuning", "objective"))
    lines = [
        "| tuning | step | trainable params | peak RSS (GiB) | step increment (GiB) | step (s) | π_t pass (s) | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, runs in groups.items():
        reference = median(key, "reference_pass_s")
        lines.append(
            f"| {key[0]} | {key[1]} | {runs[0]['trainable_parameters'] / 1e6:.2f} M | {median(key, 'peak_gib'):.3f} | "
            f"{median(key, 'increment_gib'):.3f} | {median(key, 'step_s'):.2f} | "
            f"{'—' if reference != reference else f'{reference:.2f}'} | {len(runs)} |"
        )
    ratios = []
    for tuning in dict.fromkeys(t for t, _ in groups):
        for baseline in ("sft", "sft_hf"):
            if (tuning, "refuel") in groups and (tuning, baseline) in groups:
                peak = median((tuning, "refuel"), "peak_gib") / median((tuning, baseline), "peak_gib")
                step = median((tuning, "refuel"), "step_s") / median((tuning, baseline), "step_s")
                ratios.append(f"- {tuning}: REFUEL / {baseline} peak RSS {peak:.3f}×, step time {step:.2f}×")
    return "\n".join([*lines, "", *ratios])


@console_command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy name, folder or hub id")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per batch B (2B sequences)")
    parser.add_argument("--prompt_tokens", type=int, default=64, help="tokens of s_h per sequence")
    parser.add_argument("--reply_tokens", type=int, default=64, help="tokens of each turn-h reply")
    parser.add_argument("--steps", type=int, default=1, help="measured steps per run (after one warm-up step)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per configuration; figures are medians")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--lora_ranks", type=int, nargs="+", default=[0, 16], help="0 = full fine-tuning")
    parser.add_argument("--objectives", nargs="+", default=["refuel", "sft"], choices=OBJECTIVES)
    parser.add_argument("--json", type=Path, help="also write every run's measurements here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--objective", choices=OBJECTIVES, help=argparse.SUPPRESS)
    parser.add_argument("--lora_r", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_model_name("--model", args.model)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    print(machine_header("training memory", {"weights": "float32", "autocast": args.mixed_precision}))
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    results = []
    started = time.monotonic()
    for run in range(args.runs):  # interleaved, so that a change of machine load hits every configuration
        for lora_r in args.lora_ranks:
            for objective in args.objectives:
                results.append(run_worker(worker_command(args, objective, lora_r), env, f"{objective} lora_r={lora_r}"))
                print(f"run {run + 1}/{args.runs} lora_r={lora_r} {objective}: {results[-1]}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(
        f"{args.model}: B = {args.pairs} pairs = {2 * args.pairs} sequences × "
        f"{args.prompt_tokens + args.reply_tokens} tokens ({args.reply_tokens} reply), {args.mixed_precision} "
        f"autocast on fp32 weights, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"{args.threads} thread(s), median of {args.runs} runs ({time.monotonic() - started:.0f} s in all)\n"
    )
    print(table(results))
    if not all(r["peak_reset"] for r in results):
        print("\nnote: the RSS high-water mark could not be reset; peaks include model loading")


if __name__ == "__main__":
    main()
