"""Headroom of the CPU math rewards: genuine SmolLM2 replies against replies that should not score.

Usage (the numbers in :class:`dialogsim.rewards.math_format.MathFormatReward`'s docstring)::

    python -m bench.reward_headroom --replies /tmp/smollm_replies.jsonl

Takes the held-out GSM8K Math_CoT prompts the project evaluates on (``holdout`` prompts chosen by id
hash, as ``refuel-train`` / ``refuel-evaluate`` do), samples ``--samples`` turn-1 replies per prompt
from the policy (generated once and cached in ``--replies``; re-runs read the cache), and scores single-
turn dialogues with each reward for these reply categories:

- ``genuine``: the policy's replies;
- ``genuine, scored on the previous row``: the same replies scored as answers to another prompt (the
  chance level: what a reply earns without being about its problem);
- ``restated problem``: the problem text (the instruction without its fixed first lines);
- ``copied prompt``: the whole instruction, format line included;
- ``empty``: ``""``;
- ``other row's solution``: the worked reference solution of the previous prompt;
- ``reference solution``: the row's own worked solution;
- ``bare boxed correct`` / ``bare boxed wrong``: ``\\boxed{reference}`` / ``\\boxed{reference + 1}``;
- ``correct unboxed``: ``The answer is <reference>.``;
- ``number list``: the integers 1..40, a reply that lists numbers instead of working.

Prints the mean (and std) per category and reward, the parts of the new reward on genuine replies, and
the spread of r − r' between two samples of the same prompt (the REFUEL regression target).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pandas as pd

from bench.runs import machine_header
from dialogsim.backends.transformers_backend import TransformersBackend, load_tokenizer
from dialogsim.console import EPILOG, console_command
from dialogsim.data import PromptConfig, load_prompt_rows
from dialogsim.messages import Message
from dialogsim.models import DEFAULT_MODEL, check_model_name
from dialogsim.precision import ENGINE_DTYPES
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import RewardModel
from dialogsim.rewards.factory import build_reward_model
from dialogsim.rewards.math_format import MathFormatReward
from dialogsim.rewards.math_reward import reference_solution
from dialogsim.sampling import SamplingParams

REWARD_SPECS = ("math", "math_format")
NUMBER_LIST = " ".join(str(number) for number in range(1, 41))


def held_out_rows(holdout: int, max_prompt_tokens: int) -> list[PromptRow]:
    """The held-out GSM8K Math_CoT rows of the shared prompt file (the project's evaluation prompts)."""
    config = PromptConfig(holdout=holdout, max_prompt_tokens=max_prompt_tokens)  # Math_CoT / gsm8k / train
    return load_prompt_rows(config, load_tokenizer(DEFAULT_MODEL), "heldout")[0]


def policy_replies(rows: list[PromptRow], args: argparse.Namespace) -> dict[str, list[str]]:
    """``--samples`` replies per row id, read from ``--replies`` or generated once and written there."""
    path = Path(args.replies)
    if not path.exists():
        backend = TransformersBackend(args.model, dtype=args.engine_dtype, batch_size=args.batch_size)
        conversations = [[{"role": "user", "content": row.instruction}] for row in rows] * args.samples
        sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
        completions = backend.chat(conversations, sampling)
        with path.open("w") as handle:
            for index, completion in enumerate(completions):
                row = rows[index % len(rows)]
                record = {"prompt_id": row.id, "sample": index // len(rows), "reply": completion.text}
                handle.write(json.dumps(record) + "\n")
    replies: dict[str, list[str]] = {}
    with path.open() as handle:
        for line in handle:
            record = json.loads(line)
            replies.setdefault(record["prompt_id"], []).append(record["reply"])
    missing = [row.id for row in rows if len(replies.get(row.id, [])) < args.samples]
    if missing:
        raise ValueError(f"{path}: {len(missing)} prompts lack {args.samples} replies; delete the file to regenerate")
    return replies


def problem_text(row: PromptRow) -> str:
    """The instruction without the fixed lines before the problem (the last paragraph line onwards)."""
    return row.instruction.split("\n", 2)[-1]


def categories(
    rows: list[PromptRow], replies: dict[str, list[str]], samples: int
) -> dict[str, list[tuple[PromptRow, str]]]:
    """(row, reply) pairs per reply category (see the module docstring); ``genuine`` holds sample 0 of every
    row, then sample 1, and so on."""
    wrong = {row.id: str(int(row.reference) + 1) for row in rows}  # GSM8K references are integers
    return {
        "genuine": [(row, replies[row.id][sample]) for sample in range(samples) for row in rows],  # sample-major
        "genuine, scored on the previous row": [
            (rows[index - 1], replies[row.id][sample]) for sample in range(samples) for index, row in enumerate(rows)
        ],
        "restated problem": [(row, problem_text(row)) for row in rows],
        "copied prompt": [(row, row.instruction) for row in rows],
        "empty": [(row, "") for row in rows],
        "other row's solution": [(row, reference_solution(rows[index - 1])) for index, row in enumerate(rows)],
        "reference solution": [(row, reference_solution(row)) for row in rows],
        "bare boxed correct": [(row, f"\\boxed{{{row.reference}}}") for row in rows],
        "bare boxed wrong": [(row, f"\\boxed{{{wrong[row.id]}}}") for row in rows],
        "correct unboxed": [(row, f"The answer is {row.reference}.") for row in rows],
        "number list": [(row, NUMBER_LIST) for row in rows],
    }


def dialogue(row: PromptRow, reply: str) -> list[Message]:
    """The single-turn dialogue of ``row``'s instruction and ``reply``."""
    return [{"role": "user", "content": row.instruction}, {"role": "assistant", "content": reply}]


def score(reward: RewardModel, pairs: list[tuple[PromptRow, str]]) -> list[float]:
    """The reward of each (row, reply) as a single-turn dialogue."""
    return reward.score([dialogue(row, reply) for row, reply in pairs], [row for row, _ in pairs])


def markdown(frame: pd.DataFrame) -> str:
    """``frame`` as a Markdown table (index first), floats to 3 decimals."""
    cells = [
        [str(index), *(f"{value:.3f}" if isinstance(value, float) else str(value) for value in row)]
        for index, row in zip(frame.index, frame.itertuples(index=False), strict=True)
    ]
    lines = [[frame.index.name or "", *map(str, frame.columns)], ["---"] * (len(frame.columns) + 1), *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


@console_command
def main(argv: list[str]) -> None:
    """Print the per-category table, the parts of the new reward and the spread of r − r'."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], epilog=EPILOG)
    parser.add_argument("--replies", default="/tmp/smollm_replies.jsonl", help="cache of the policy's replies")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="policy model (name, folder or hub id)")
    parser.add_argument("--holdout", type=int, default=PromptConfig.holdout, help="held-out prompts (as configured)")
    parser.add_argument("--max_prompt_tokens", type=int, default=PromptConfig.max_prompt_tokens, help="prompt budget")
    parser.add_argument("--samples", type=int, default=2, help="replies per prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="policy sampling temperature")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="reply cap (tokens)")
    parser.add_argument("--batch_size", type=int, default=32, help="conversations per generate call")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--engine_dtype", default="auto", choices=ENGINE_DTYPES, help="precision of the engines")
    args = parser.parse_args(argv)
    check_model_name("--model", args.model)
    print(machine_header("reward headroom", {"policy": args.engine_dtype, "reward models": "float32"}))

    rows = held_out_rows(args.holdout, args.max_prompt_tokens)
    replies = policy_replies(rows, args)
    pairs = categories(rows, replies, args.samples)
    rewards = {spec: build_reward_model(spec, dtype="float32") for spec in REWARD_SPECS}
    scores = {spec: {name: score(reward, pairs[name]) for name in pairs} for spec, reward in rewards.items()}
    table = pd.DataFrame(
        {
            "n": [len(pairs[name]) for name in pairs],
            **{
                f"{spec} mean (std)": [
                    f"{statistics.mean(values):.3f} ({statistics.pstdev(values):.3f})"
                    for values in scores[spec].values()
                ]
                for spec in REWARD_SPECS
            },
        },
        index=list(pairs),
    )
    print(f"{len(rows)} held-out GSM8K prompts, {args.samples} replies each from {args.model}\n")
    print(markdown(table))

    new_reward = MathFormatReward()
    parts = pd.DataFrame([new_reward.parts(dialogue(row, reply), row) for row, reply in pairs["genuine"]])
    print("\nparts of math_format on genuine replies (mean, rate of non-zero):")
    print(markdown(pd.DataFrame({"mean": parts.mean(), "non-zero": (parts > 0).mean()})))

    print("\nr − r' between sample 0 and sample 1 of the same prompt:")
    lines = []
    for spec in REWARD_SPECS:
        genuine = scores[spec]["genuine"]
        differences = [genuine[index] - genuine[index + len(rows)] for index in range(len(rows))]
        lines.append(
            {
                "reward": spec,
                "std of r (genuine)": statistics.pstdev(genuine),
                "std of r − r'": statistics.pstdev(differences),
                "mean |r − r'|": statistics.mean(abs(value) for value in differences),
                "share r ≠ r'": statistics.mean(abs(value) > 1e-9 for value in differences),
            }
        )
    print(markdown(pd.DataFrame(lines).set_index("reward")))


if __name__ == "__main__":
    main()
