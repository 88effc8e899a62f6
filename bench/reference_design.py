"""Anchor: REFUEL pairs per minute in the REFUEL public code's design vs ours, same prompts, model and machine.

Usage (the README's numbers)::

    python -m bench.reference_design --pairs 32 --max_horizon 3 --max_new_tokens 128 --repeats 3

The public code (github.com/ZhaolinGao/REFUEL, ``setting_one/generate.py``) collects a REFUEL iteration's
data turn by turn, each turn one new process per role: a process loads a fresh engine for π_t, generates
that turn's reply for every dialogue and saves the dialogues; then a process loads a fresh engine for the
simulated user and generates its next message. It first generates full dialogues with π_t (the roll-in
and the first branch's roll-out), then cuts each dialogue before the reply of a sampled turn h and
generates the second branch from there, again turn by turn with fresh engines. Nothing is kept between
turns: no engine, no KV cache, no batch across roles.

This script times that design with our engines, prompts and reward: per turn and role one
``python -m bench.reference_design --child ...`` process builds the engine (``--backend``), generates for
every dialogue active at that turn, and writes them back; both branches are scored by the same reward.
Each dialogue runs to its own horizon H ~ U{1..max} (the public code runs every dialogue to the largest
horizon, which costs more), so the anchor's time is a lower bound on the design's. Ours is
:func:`refuel.collection.collect.collect_pairs` on one engine serving π_t and the simulated user (the main job's
arrangement), its one engine start per iteration timed separately and included in the ratio.

Prints one table (median of ``--repeats`` runs made in this one invocation, seeds 0, 1, ...) and, as its
last line, ``reference-design ratio: <x>`` (our pairs/min with our engine start / the anchor's).
Run it alone: other processes on the CPU distort every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.runs import machine_header
from dialogsim.backends.factory import build_backend
from dialogsim.backends.serving import ServingEngine
from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.console import EPILOG, console_command
from dialogsim.data import default_prompt_file, load_prompts
from dialogsim.messages import Message
from dialogsim.models import DEFAULT_MODEL, check_model_name
from dialogsim.precision import ENGINE_DTYPES
from dialogsim.prompts import PromptRow
from dialogsim.rewards.factory import build_reward_model
from dialogsim.sampling import SamplingParams
from dialogsim.simulator import DialogueSimulator, EpisodeConfig
from dialogsim.user import UserSimulator
from refuel.collection.collect import collect_pairs

USER_TEMPLATE = "student"


def child(role: str, path: Path, args: argparse.Namespace) -> None:
    """One turn of one role in a fresh process: load the engine, extend every dialogue in ``path`` by one message.

    ``path`` holds a JSON list of dialogues (``list[Message]``); policy dialogues end with a user message
    and get an assistant reply, user dialogues end with an assistant reply and get the next user message.
    """
    dialogues: list[list[Message]] = json.loads(path.read_text())
    backend = build_backend(args.backend, args.model, dtype=args.engine_dtype, kv_cache_gib=2)
    if role == "policy":
        sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
        replies = [completion.text for completion in backend.chat(dialogues, sampling)]
        added = [{"role": "assistant", "content": text} for text in replies]
    else:
        turns = UserSimulator(backend, USER_TEMPLATE).next_questions(dialogues, seed=args.seed)
        added = [{"role": "user", "content": turn.text} for turn in turns]
    path.write_text(json.dumps([[*dialogue, message] for dialogue, message in zip(dialogues, added, strict=True)]))


def fresh_engine_turn(role: str, dialogues: list[list[Message]], args: argparse.Namespace, seed: int) -> None:
    """Run :func:`child` for ``role`` in a new process and append its message to each dialogue (in place).

    Raises:
        RuntimeError: the child process failed (with the tail of its stderr).
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dialogues.json"
        path.write_text(json.dumps(dialogues))
        command = [sys.executable, "-m", __spec__.name, "--child", role, "--io", str(path), "--seed", str(seed)]
        command += ["--backend", args.backend, "--model", args.model]
        command += ["--max_new_tokens", str(args.max_new_tokens), "--temperature", str(args.temperature)]
        process = subprocess.run(command, capture_output=True, text=True, check=False)
        if process.returncode != 0:
            raise RuntimeError(f"{role} turn failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
        for dialogue, extended in zip(dialogues, json.loads(path.read_text()), strict=True):
            dialogue.append(extended[-1])


def turn_by_turn(
    dialogues: list[list[Message]], first: list[int], horizons: list[int], args: argparse.Namespace, seed: int
) -> int:
    """Generate dialogue i's turns ``first[i]..horizons[i]`` (fresh engines per turn and role); returns the starts."""
    starts = 0
    for turn in range(1, args.max_horizon + 1):
        active = [i for i in range(len(dialogues)) if first[i] <= turn <= horizons[i]]
        if not active:
            continue
        fresh_engine_turn("policy", [dialogues[i] for i in active], args, seed + 2 * turn)
        asking = [i for i in active if turn < horizons[i]]
        starts += 1 + bool(asking)
        if asking:
            fresh_engine_turn("user", [dialogues[i] for i in asking], args, seed + 2 * turn + 1)
    return starts


def before_reply(dialogue: list[Message], turn: int) -> list[Message]:
    """``dialogue`` up to and including the user message of ``turn`` (1-based): the reset state s_h."""
    users = [i for i, message in enumerate(dialogue) if message["role"] == "user"]
    return [dict(message) for message in dialogue[: users[turn - 1] + 1]]  # type: ignore[misc]


def anchor_run(rows: list[PromptRow], args: argparse.Namespace, seed: int) -> dict[str, float]:
    """One REFUEL iteration's pairs in the public code's design: wall seconds and engine starts."""
    rng = np.random.default_rng(seed)
    chosen = [rows[i] for i in rng.choice(len(rows), size=args.pairs, replace=False)]
    horizons = [int(h) for h in rng.integers(1, args.max_horizon + 1, size=args.pairs)]
    turns = [int(rng.integers(1, horizon + 1)) for horizon in horizons]
    reward = build_reward_model(args.reward)
    started = time.perf_counter()
    first_branch: list[list[Message]] = [[{"role": "user", "content": row.instruction}] for row in chosen]
    starts = turn_by_turn(first_branch, [1] * args.pairs, horizons, args, seed)
    second_branch = [before_reply(dialogue, turn) for dialogue, turn in zip(first_branch, turns, strict=True)]
    starts += turn_by_turn(second_branch, turns, horizons, args, seed + 1000)
    reward.score(first_branch + second_branch, chosen + chosen)
    return {"seconds": time.perf_counter() - started, "engine starts": starts}


def our_engine(args: argparse.Namespace) -> tuple[ServingEngine, float]:
    """The one engine that serves π_t and the simulated user in our design, and its start time (seconds)."""
    started = time.perf_counter()
    serving = ServingEngine(args.backend, dtype=args.engine_dtype, kv_cache_gib=2)
    serving.serve(args.model)
    return serving, time.perf_counter() - started


def ours_run(
    serving: ServingEngine, rows: list[PromptRow], tokenizer: object, args: argparse.Namespace, seed: int
) -> float:
    """Wall seconds of one REFUEL iteration's pairs on ``serving`` (its prefix cache emptied first)."""
    if hasattr(serving.backend, "reset_prefix_cache"):
        serving.backend.reset_prefix_cache()  # one timed run must not warm the next
    simulator = DialogueSimulator(
        rows,
        UserSimulator(serving.role(args.model), USER_TEMPLATE),
        build_reward_model(args.reward),
        EpisodeConfig(max_horizon=args.max_horizon),
        tokenizer,  # type: ignore[arg-type]
    )
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    collect_pairs(simulator, serving.role(args.model), args.pairs, sampling, seed=seed, batch_size=args.pairs)
    return time.perf_counter() - started


@console_command
def main(argv: list[str]) -> None:
    """Parse flags; as ``--child`` run one fresh-engine turn, else time both designs and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--backend", default="vllm", choices=["transformers", "vllm"], help="engine of both designs")
    parser.add_argument("--pairs", type=int, default=32, help="REFUEL pairs per iteration")
    parser.add_argument("--max_horizon", type=int, default=3, help="H ~ U{1..max}")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="policy reply cap (tokens)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--reward", default="math_format")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine_dtype", default="auto", choices=ENGINE_DTYPES, help="precision of the engines")
    parser.add_argument("--child", choices=["policy", "user"], help=argparse.SUPPRESS)
    parser.add_argument("--io", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_model_name("--model", args.model)
    if args.child:
        child(args.child, args.io, args)
        return
    print(machine_header("reference design", {"engines": args.engine_dtype}))
    tokenizer = load_tokenizer(args.model)
    rows, _ = load_prompts(
        default_prompt_file(), tasks=["Math_CoT"], datasets=["gsm8k"], tokenizer=tokenizer, max_prompt_tokens=384
    )
    rows = rows[:256]
    serving, ours_start = our_engine(args)  # idle (no CPU) while the anchor's processes run
    anchor, ours = [], []
    for seed in range(args.repeats):  # interleaved, so a change of machine load hits both designs
        anchor.append(anchor_run(rows, args, seed))
        ours.append(ours_run(serving, rows, tokenizer, args, seed))
    anchor_seconds = statistics.median(run["seconds"] for run in anchor)
    ours_seconds = statistics.median(ours)
    table = pd.DataFrame(
        {
            "pairs/min": {
                "REFUEL public-code design (fresh engine per turn and role)": 60 * args.pairs / anchor_seconds,
                "ours, one engine start included": 60 * args.pairs / (ours_seconds + ours_start),
                "ours, collection only": 60 * args.pairs / ours_seconds,
            },
            "engine starts": {
                "REFUEL public-code design (fresh engine per turn and role)": statistics.median(
                    run["engine starts"] for run in anchor
                ),
                "ours, one engine start included": 1,
                "ours, collection only": 0,
            },
        }
    )
    print(
        f"\nREFUEL pairs/min, {args.pairs} pairs, H ~ U{{1..{args.max_horizon}}}, {args.max_new_tokens}-token replies, "
        f"{args.backend} engines, median of {args.repeats}; our engine start {ours_start:.1f} s"
    )
    print(table.round(2).to_string())
    print(f"reference-design ratio: {anchor_seconds / (ours_seconds + ours_start):.2f}")


if __name__ == "__main__":
    main()
