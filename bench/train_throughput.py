"""REFUEL training throughput: pair-epochs per minute, peak memory and bf16 log-prob noise, old path vs new path.

    python -m bench.train_throughput                 # SmolLM2-135M-Instruct, the main job's pair shapes, 3 runs
    python -m bench.train_throughput --runs 5 --pairs 32
    python -m bench.train_throughput --pairs_file runs/cpu-main/iteration_0/pairs.jsonl --paths shared_prefix \
        --pairs 24 --idle_vllm      # the main job's real pairs, beside an idle vLLM engine as in refuel-train

Paths (each in a fresh subprocess, ``--runs`` times, interleaved; every figure is the median over runs):

- ``separate``: two right-padded sequences per pair, logits at every position, micro-batches drawn without
  regard to length (``pair_layout separate``, ``length_buckets false``: the trainer before this benchmark);
- ``shared_prefix``: s_h once per pair with y and y' after it under a block mask, logits at the reply
  positions only, micro-batches of similar length (``pair_layout shared_prefix``, ``length_buckets true``);

each in fp32 and with bf16 autocast (fp32 master weights). The pairs have the main job's shapes: s_1 is a
real GSM8K instruction from the shared prompt file under SmolLM2's chat template; h ~ the main job's
distribution (H ~ U{1..3}, h ~ U{1..H}), each earlier turn adding a 128-token reply and a 24-token user
question; replies of U{48..128} tokens (content does not set time; shapes do). Training runs the main
job's batch: 4 pairs per micro-batch, 2 accumulation steps, one epoch over the training pairs.

Columns: ``pair-epochs/min`` (pairs trained per minute: forward, backward, AdamW), ``π_t pairs/min``
(the no-grad log-prob pass done once per iteration), ``peak RSS`` (GiB, the process's high-water mark
after loading), ``|Δ| at π_t`` (the largest |relative log-ratio| over the training pairs before the first
step, nats: exactly 0 when π_t's log-probs come from the training computation) and ``batch noise`` (the
largest |ln π_t(y|s_h)| difference between a pair's micro-batch and the same pair alone, nats: the
noise that a different batch composition would put into the log-ratio) and ``ratio error after training``
(after the epoch, the largest |relative log-ratio as the training precision computes it − the same trained
weights' ratio computed in fp32|, nats: what bf16 autocast adds to the quantity the loss regresses once the
weights have moved; 0 in fp32). The last line is ``speed-up: <x>``, shared_prefix fp32 over separate fp32 (the
main job's path before and after; bf16 is exact at π_t but its log-ratios go wrong once the weights move,
README "Training path").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.memory import GIB, peak_rss_bytes, reset_peak_rss
from bench.runs import grouped_medians, machine_header, run_worker
from dialogsim.console import EPILOG, console_command
from dialogsim.models import check_model_name

PATHS = {"separate": ("separate", False), "shared_prefix": ("shared_prefix", True)}
PRECISIONS = ("no", "bf16")


def main_job_pairs(tokenizer: Any, pairs: int, seed: int) -> list[dict[str, Any]]:
    """``pairs`` tokenised pairs with the main job's shapes (see the module docstring)."""
    import numpy as np

    from dialogsim.backends.transformers_backend import chat_prompt_ids
    from dialogsim.data import default_prompt_file, load_prompts

    prompts, _ = load_prompts(
        default_prompt_file(), tasks=["Math_CoT"], datasets=["gsm8k"], limit=pairs, shuffle=True, seed=seed
    )
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    rows = []
    for row in prompts:
        horizon = int(rng.integers(1, 4))
        turn = int(rng.integers(1, horizon + 1))
        state = chat_prompt_ids(tokenizer, [{"role": "user", "content": row.instruction}])
        for _ in range(turn - 1):  # an earlier reply and user question, with their template tokens
            state += rng.integers(100, vocab, 128 + 24 + 10).tolist()
        replies = [rng.integers(100, vocab, int(rng.integers(48, 129))).tolist() for _ in range(2)]
        rows.append(
            {
                "input_ids": state + replies[0],
                "loss_mask": [0] * len(state) + [1] * len(replies[0]),
                "input_ids_prime": state + replies[1],
                "loss_mask_prime": [0] * len(state) + [1] * len(replies[1]),
                "reward": float(rng.random()),
                "reward_prime": float(rng.random()),
            }
        )
    return rows


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One (path, precision) in this fresh process: π_t pass, one epoch of training, noise, peak RSS."""
    import torch
    from transformers import AutoModelForCausalLM

    from dialogsim.backends.transformers_backend import load_tokenizer
    from dialogsim.models import resolve_model
    from dialogsim.precision import training_dtype
    from refuel.config import RefuelConfig
    from refuel.training.trainer import RefuelTrainer

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=training_dtype())
    if args.pairs_file is not None:  # real collected pairs (refuel-train's pairs.jsonl), their first --pairs
        from refuel.pairs import read_tokenized_pairs

        rows = [dict(pair) for pair in read_tokenized_pairs(args.pairs_file)[: args.pairs]]
    else:
        rows = main_job_pairs(tokenizer, args.pairs, seed=0)
    layout, buckets = PATHS[args.path]
    reset = reset_peak_rss()
    with tempfile.TemporaryDirectory() as output_dir:
        config = RefuelConfig(
            output_dir=output_dir,
            per_device_batch_size=4,
            gradient_accumulation_steps=2,
            epochs=1,
            learning_rate=1e-6,
            mixed_precision=args.precision,
            pair_layout=layout,
            length_buckets=buckets,
        )
        started = time.perf_counter()
        trainer = RefuelTrainer(config, model, tokenizer, rows, [])
        scored = trainer.compute_logp_t()
        reference_s = time.perf_counter() - started
        with torch.no_grad():  # relative log-ratios at π = π_t, [B] per micro-batch
            ratios = trainer._per_micro_batch(
                trainer.eval_loaders["train"], lambda b: trainer._loss_inputs(b).relative_log_ratio()
            )
        largest_ratio = max(ratio.abs().max().item() for ratio in ratios.values())
        noise = batch_noise(trainer, scored.train)
        exact_t = exact_ratio_inputs(trainer)  # fp32 ln π_t of every reply, outside the timed training
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
        drift = ratio_error(trainer, exact_t)
    return {
        "path": args.path,
        "precision": args.precision,
        "pair_epochs_per_min": 60 * len(rows) / train_s,
        "reference_pairs_per_min": 60 * len(rows) / reference_s,
        "peak_gib": peak_rss_bytes() / GIB,
        "peak_reset": reset,
        "ratio_at_pi_t": largest_ratio,
        "ratio_error_after": drift,
        "batch_noise": noise,
        "pairs": len(rows),
        "tokens_per_pair": statistics.mean(len(r["input_ids"]) + len(r["input_ids_prime"]) for r in rows),
    }


def exact_ratio_inputs(trainer: Any) -> dict[int, Any]:
    """ln π(y|s_h), ln π(y'|s_h) of every training micro-batch in fp32 (the model's forward without autocast),
    ``[2B]`` per micro-batch index."""
    import torch

    from refuel.training.layout import sequence_logprobs

    model = trainer.model
    wrapped = model.forward
    model.forward = getattr(model, "_original_forward", wrapped)  # accelerate keeps the forward it wrapped
    try:
        with torch.no_grad():
            return trainer._per_micro_batch(
                trainer.eval_loaders["train"],
                lambda batch: sequence_logprobs(model, batch, trainer.config.temperature),
            )
    finally:
        model.forward = wrapped


def ratio_error(trainer: Any, exact_t: dict[int, Any]) -> float:
    """After training: largest |relative log-ratio in the training precision − the same in fp32| (nats).

    Both ratios are of the same trained weights and pairs: the training precision's from its own π_t
    log-probs (exact at π_t), fp32's from :func:`exact_ratio_inputs` before and after. 0 for fp32 itself.
    """
    import torch

    from refuel.training.loss import relative_log_ratio

    trainer.model.eval()
    with torch.no_grad():  # [6, B] per micro-batch: the refuel_loss arguments
        loader = trainer.eval_loaders["train"]
        trained = trainer._per_micro_batch(loader, lambda batch: torch.stack(trainer._loss_inputs(batch)))
    exact = exact_ratio_inputs(trainer)
    largest = 0.0
    for index, inputs in trained.items():
        ours = relative_log_ratio(*inputs[:4].float())  # [B]
        fp32 = relative_log_ratio(*torch.tensor_split(exact[index], 2), *torch.tensor_split(exact_t[index], 2))
        largest = max(largest, (ours - fp32).abs().max().item())
    return largest


def batch_noise(trainer: Any, scored: list[dict[str, Any]], sample: int = 4) -> float:
    """Largest |ln π_t(y|s_h) in its micro-batch − the same alone| over the first ``sample`` of the ``scored``
    training pairs' replies, nats."""
    import torch

    from refuel.training.layout import collate, sequence_logprobs

    largest = 0.0
    config = trainer.config
    with torch.no_grad():
        for pair in scored[:sample]:
            alone = collate([pair], config.pair_layout, trainer.pad_id)
            values = sequence_logprobs(trainer.model, alone, config.temperature).float().tolist()
            largest = max(largest, abs(values[0] - pair["logp_t"]), abs(values[1] - pair["logp_t_prime"]))
    return largest


def precision_name(precision: str) -> str:
    """``mixed_precision`` as the table prints it (``no`` is fp32)."""
    return "fp32" if precision == "no" else precision


def table(results: list[dict[str, Any]]) -> tuple[str, float | None]:
    """Markdown table of the medians per (path, precision); speed-up of shared_prefix fp32 over separate fp32
    (None when either was not run; the ratio column is then relative to the first configuration)."""
    groups, median = grouped_medians(results, ("path", "precision"))
    old_path, new_path = ("separate", "no"), ("shared_prefix", "no")
    base = old_path if old_path in groups else next(iter(groups))
    baseline = median(base, "pair_epochs_per_min")
    lines = [
        f"| path | precision | pair-epochs/min | × {base[0]} {precision_name(base[1])} | π_t pairs/min "
        "| peak RSS (GiB) | |Δ| at π_t (nats) "
        "| batch noise (nats) | ratio error after training (nats) | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, runs in groups.items():
        speed = median(key, "pair_epochs_per_min")
        lines.append(
            f"| {key[0]} | {precision_name(key[1])} | {speed:.1f} | {speed / baseline:.2f} | "
            f"{median(key, 'reference_pairs_per_min'):.1f} | {median(key, 'peak_gib'):.2f} | "
            f"{max(r['ratio_at_pi_t'] for r in runs):.2g} | {max(r['batch_noise'] for r in runs):.2g} | "
            f"{max(r['ratio_error_after'] for r in runs):.2g} | {len(runs)} |"
        )
    if old_path not in groups or new_path not in groups:
        return "\n".join(lines), None
    return "\n".join(lines), median(new_path, "pair_epochs_per_min") / baseline


@console_command
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy name, folder or hub id")
    parser.add_argument("--pairs", type=int, default=16, help="training pairs per run (one epoch)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per configuration; figures are medians")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads per process")
    parser.add_argument("--json", type=Path, help="also write every run's measurements here")
    parser.add_argument("--pairs_file", type=Path, help="real pairs (a run's pairs.jsonl) instead of synthetic shapes")
    parser.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=list(PATHS), help="paths to run")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument(
        "--idle_vllm",
        action="store_true",
        help="keep an idle vLLM engine of the model alive in this process meanwhile, as refuel-train does between "
        "collection and training (its memory and processes; it generates nothing)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=sorted(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_model_name("--model", args.model)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    dtypes = {"weights": "float32", "autocast": " / ".join(args.precisions)}
    print(machine_header("training throughput", dtypes | ({"idle vLLM engine": "auto"} if args.idle_vllm else {})))
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    results = []
    if args.idle_vllm:
        from dialogsim.backends.vllm_backend import VLLMBackend

        engine = VLLMBackend(args.model, kv_cache_gib=2, max_model_len=4096)  # noqa: F841 (kept alive, idle)
    started = time.monotonic()
    for run in range(args.runs):  # interleaved, so that a change of machine load hits every configuration
        for path in args.paths:
            for precision in args.precisions:
                command = [sys.executable, "-m", __spec__.name, "--worker", "--path", path]
                command += ["--precision", precision, "--model", args.model, "--pairs", str(args.pairs)]
                command += ["--threads", str(args.threads)]
                if args.pairs_file is not None:
                    command += ["--pairs_file", str(args.pairs_file)]
                results.append(run_worker(command, env, f"{path} {precision}"))
                print(f"run {run + 1}/{args.runs} {path} {precision}: {results[-1]}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    rendered, speed_up = table(results)
    source = f"real pairs from {args.pairs_file}" if args.pairs_file else "pairs of the main job's shapes"
    idle = ", beside an idle vLLM engine" if args.idle_vllm else ""
    print(
        f"{args.model}: {results[0]['pairs']} {source}{idle} "
        f"({statistics.mean(r['tokens_per_pair'] for r in results):.0f} tokens per pair as two sequences), "
        f"4 pairs × 2 accumulation per step, {args.threads} thread(s), median of {args.runs} runs "
        f"({time.monotonic() - started:.0f} s in all)\n"
    )
    print(rendered)
    if not all(r["peak_reset"] for r in results):
        print("\nnote: the RSS high-water mark could not be reset; peaks include model loading")
    print("speed-up: n/a (needs both paths in fp32)" if speed_up is None else f"speed-up: {speed_up:.2f}")


if __name__ == "__main__":
    main()
