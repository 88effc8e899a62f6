"""Profile batched ``transformers`` generation: where a batch of turn replies spends its time.

Usage (the README's numbers)::

    python -m bench.generation_profile --batch 32 --sequential 8 --new_tokens 16 --repeats 3

Splits the wall time of generating one reply per conversation into prefill (the forward pass over
the prompt) and decode (one forward per new token), for one conversation at a time and for a
left-padded batch, on real first-turn prompts of the shared data with the default model. Prints:

- seconds per prompt token of prefill and seconds per generated token of decode, sequential vs
  batched, and their ratio (the speed-up batching buys in each phase);
- the padding fraction of the batched prompt tokens;
- for the simulated user's real sampling settings (stop string "?", its token cap), the fraction of
  decode slots that carry a live reply (a batch runs until its longest reply ends).

Each time is the median of ``--repeats`` runs. Run it alone: other processes distort every figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from bench.runs import machine_header
from dialogsim.backends.transformers_backend import TransformersBackend, chat_prompt_ids
from dialogsim.console import EPILOG, console_command
from dialogsim.data import default_prompt_file, load_prompts
from dialogsim.models import DEFAULT_MODEL, check_model_name
from dialogsim.precision import ENGINE_DTYPES
from dialogsim.prompts import PromptRow
from dialogsim.user import TEMPLATES, render_user_prompt


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.inference_mode()
def generate(backend: TransformersBackend, prompts: list[list[int]], new_tokens: int, **sampling: Any) -> torch.Tensor:
    """Left-padded ``generate`` of ``prompts``; ``new_tokens`` exactly unless stopping is allowed.

    Returns the new tokens, ``[batch, new_tokens]`` (padding after an early stop).
    """
    backend.tokenizer.padding_side = "left"
    batch = backend.tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    fixed = {} if sampling else {"min_new_tokens": new_tokens, "do_sample": False}
    output = backend.model.generate(
        **batch, max_new_tokens=new_tokens, pad_token_id=backend.tokenizer.pad_token_id, **fixed, **sampling
    )
    return output[:, batch["input_ids"].shape[1] :]


def phase_costs(backend: TransformersBackend, groups: list[list[list[int]]], new_tokens: int, repeats: int) -> dict:
    """Prefill seconds per prompt token and decode seconds per new token, summed over ``groups``."""
    prefill = sum(median_seconds(lambda g=g: generate(backend, g, 1), repeats) for g in groups)
    full = sum(median_seconds(lambda g=g: generate(backend, g, new_tokens), repeats) for g in groups)
    prompt_tokens = sum(len(p) for g in groups for p in g)
    replies = sum(len(g) for g in groups)
    return {
        "prefill s / prompt token": prefill / prompt_tokens,
        "decode s / new token": (full - prefill) / (replies * (new_tokens - 1)),
        "prefill share of time": prefill / full,
    }


def user_prompts(backend: TransformersBackend, rows: list[PromptRow]) -> list[list[int]]:
    """The simulated user's prompts after a first exchange (the row's question, its gold solution)."""
    dialogues = [
        [{"role": "user", "content": r.instruction}, {"role": "assistant", "content": r.meta["source_solution"]}]
        for r in rows
    ]
    return [chat_prompt_ids(backend.tokenizer, render_user_prompt(TEMPLATES["student"], d)) for d in dialogues]


def live_slot_fraction(backend: TransformersBackend, prompts: list[list[int]], seed: int) -> float:
    """Fraction of the batch's decode slots (rows × steps) that belong to an unfinished user reply."""
    user = TEMPLATES["student"].sampling
    torch.manual_seed(seed)
    new = generate(
        backend,
        prompts,
        user.max_new_tokens,
        do_sample=True,
        temperature=user.temperature,
        repetition_penalty=user.repetition_penalty,
        stop_strings=list(user.stop),
        tokenizer=backend.tokenizer,
    )
    pad = backend.tokenizer.pad_token_id
    lengths = [(row != pad).sum().item() + 1 for row in new]  # + the stop token, shown as pad when pad == EOS
    return sum(min(n, new.shape[1]) for n in lengths) / new.numel()


@console_command
def main(argv: list[str]) -> None:
    """Parse flags, profile sequential and batched generation, print the tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=32, help="conversations per batched generate call")
    parser.add_argument("--sequential", type=int, default=8, help="conversations run one at a time")
    parser.add_argument("--new_tokens", type=int, default=16, help="reply length in the phase split")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine_dtype", default="auto", choices=ENGINE_DTYPES, help="precision of the engines")
    args = parser.parse_args(argv)
    check_model_name("--model", args.model)
    print(machine_header("generation profile", {"transformers engine": args.engine_dtype}))
    backend = TransformersBackend(args.model, dtype=args.engine_dtype, batch_size=args.batch)
    rows, _ = load_prompts(
        default_prompt_file(),
        tasks=["Math_CoT"],
        datasets=["gsm8k"],
        tokenizer=backend.tokenizer,
        max_prompt_tokens=384,
    )
    rows = rows[: args.batch]
    prompts = [chat_prompt_ids(backend.tokenizer, [{"role": "user", "content": r.instruction}]) for r in rows]

    costs = {
        "sequential": phase_costs(backend, [[p] for p in prompts[: args.sequential]], args.new_tokens, args.repeats),
        f"batch {args.batch}": phase_costs(backend, [prompts], args.new_tokens, args.repeats),
    }
    table = pd.DataFrame(costs).T
    speedup = table.loc["sequential"] / table.loc[f"batch {args.batch}"]
    table.loc["batching speed-up"] = speedup
    table.loc["batching speed-up", "prefill share of time"] = float("nan")
    print(f"\nprefill vs decode, {args.new_tokens} new tokens, median of {args.repeats}")
    print(table.to_string(float_format=lambda x: f"{x:.4g}"))

    lengths = [len(p) for p in prompts]
    print(f"\npadding: {1 - sum(lengths) / (len(lengths) * max(lengths)):.1%} of the batched prompt tokens")
    print(f"prompt tokens: min {min(lengths)}, median {statistics.median(lengths)}, max {max(lengths)}")
    live = statistics.median(
        live_slot_fraction(backend, user_prompts(backend, rows), seed) for seed in range(args.repeats)
    )
    print(f"user sampling (stop '?', cap {TEMPLATES['student'].sampling.max_new_tokens}): {live:.1%} live slots")


if __name__ == "__main__":
    main()
