"""Decode speed of each engine in each dtype on this machine, and what ``engine_dtype=auto`` picks here.

Usage (the README's "Engine precision" table)::

    python -m bench.engine_precision                      # vLLM 64 prompts × 64 tokens, transformers 16 × 32
    python -m bench.engine_precision --engines vllm --dtypes float32 bfloat16

Each (engine, dtype) runs in a fresh process (:mod:`runs`): the engine starts on SmolLM2-135M-Instruct, decodes
once to warm up, then ``--repeats`` times greedy replies of exactly ``--new_tokens`` tokens (end-of-sequence
ignored) to real first-turn prompts of the shared data; the figure is the median of generated tokens per second
of wall time (prefill included, as a dialogue turn has it). A dtype the engine refuses on this processor is
reported with its error. The last lines give ``auto``'s choice (:func:`dialogsim.precision.engine_dtype`) and its
speed as a share of the best dtype of each engine. Run it alone: another process on the cores distorts every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bench.runs import machine_header, run_worker
from dialogsim.console import EPILOG, console_command
from dialogsim.models import DEFAULT_MODEL, check_model_name
from dialogsim.precision import backend_precision

ENGINES = ("vllm", "transformers")
DTYPES = ("float32", "bfloat16", "float16")


def prompt_ids(tokenizer: Any, count: int) -> list[list[int]]:
    """Chat-template token ids of the first ``count`` GSM8K prompts of the shared data (the main job's task)."""
    from dialogsim.backends.transformers_backend import chat_prompt_ids
    from dialogsim.data import default_prompt_file, load_prompts

    rows, _ = load_prompts(default_prompt_file(), tasks=["Math_CoT"], datasets=["gsm8k"], limit=count)
    return [chat_prompt_ids(tokenizer, [{"role": "user", "content": row.instruction}]) for row in rows]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Start one engine in ``args.dtype`` and time its decode: ``{"tokens_per_second", "start_seconds"}``."""
    started = time.perf_counter()
    if args.engine == "vllm":
        import vllm

        from dialogsim.backends.vllm_backend import VLLMBackend

        backend = VLLMBackend(args.model, dtype=args.dtype, kv_cache_gib=2, max_model_len=2048)
        prompts = [vllm.TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids(backend.tokenizer, args.prompts)]
        sampling = vllm.SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)

        def decode() -> int:
            outputs = backend.engine.generate(prompts, sampling, use_tqdm=False)
            return sum(len(output.outputs[0].token_ids) for output in outputs)

    else:
        import torch

        from dialogsim.backends.transformers_backend import TransformersBackend

        backend = TransformersBackend(args.model, dtype=args.dtype)
        backend.tokenizer.padding_side = "left"
        batch = backend.tokenizer.pad({"input_ids": prompt_ids(backend.tokenizer, args.prompts)}, return_tensors="pt")

        @torch.inference_mode()
        def decode() -> int:
            output = backend.model.generate(
                **batch,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=backend.tokenizer.pad_token_id,
            )
            return (output.shape[1] - batch["input_ids"].shape[1]) * output.shape[0]

    start_seconds = time.perf_counter() - started
    decode()  # warm-up
    rates = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        tokens = decode()
        rates.append(tokens / (time.perf_counter() - began))
    return {"tokens_per_second": statistics.median(rates), "start_seconds": start_seconds}


@console_command
def main(argv: list[str]) -> None:
    """Run every (engine, dtype) in a fresh process and print the table and ``auto``'s share of the best."""
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--vllm_prompts", type=int, default=64, help="prompts decoded together by vLLM")
    parser.add_argument("--transformers_prompts", type=int, default=16, help="prompts decoded together by transformers")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=2, help="timed decodes per process (median)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_model_name("--model", args.model)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    print(machine_header("engine precision", {engine: " / ".join(args.dtypes) for engine in args.engines}))
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    rows = []
    for engine in args.engines:
        prompts = args.vllm_prompts if engine == "vllm" else args.transformers_prompts
        for dtype in args.dtypes:
            command = [sys.executable, "-m", __spec__.name, "--worker", "--model", args.model]
            command += ["--engine", engine, "--dtype", dtype, "--prompts", str(prompts)]
            command += ["--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
            row: dict[str, Any] = {"engine": engine, "dtype": dtype, "batch": f"{prompts} × {args.new_tokens}"}
            try:
                row |= run_worker(command, env, f"{engine} {dtype}")
            except SystemExit as failure:  # a dtype this engine refuses here: report it, go on
                row["error"] = str(failure).strip().splitlines()[-1][:120]
            rows.append(row)
            print(f"{engine} {dtype}: {row}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    table = pd.DataFrame(rows).set_index(["engine", "dtype"])
    print(table.round(1).to_string())
    for engine in args.engines:
        rates = table.loc[engine]["tokens_per_second"].dropna()
        if rates.empty:
            continue
        auto = backend_precision("auto", engine).dtype
        share = rates.get(auto, float("nan")) / rates.max()
        best = f"{rates.idxmax()}, {rates.max():.0f} tok/s"
        print(f"{engine}: auto picks {auto} here: {share:.0%} of the best dtype ({best})")


if __name__ == "__main__":
    main()
