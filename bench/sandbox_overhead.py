"""Per-program cost of the code sandbox, and the MBPP check that its isolation breaks no reference solution.

Usage (the numbers under the README's reliability table)::

    python -m bench.sandbox_overhead --rows 20 --repeats 3

Runs, ``--repeats`` times, one at a time (``CodeTestReward(workers=1)``): an empty program (``pass``:
process start plus sandbox setup, the per-program overhead) and the first ``--rows`` MBPP rows of the
shared prompt file with their reference solution (must pass) and a wrong one (must fail). Prints one JSON
line: the isolation level (the strongest available) and the median seconds per program of each kind.
Exits with status 1 if a reference solution fails or a wrong one passes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench.runs import machine_header
from dialogsim.console import EPILOG, console_command
from dialogsim.data import default_prompt_file, load_prompts
from dialogsim.messages import Message
from dialogsim.rewards.code_verifier import CodeTestReward
from dialogsim.rewards.sandbox import isolation_level, run_python


def _dialogue(instruction: str, code: str) -> list[Message]:
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": f"```python\n{code}\n```"}]


@console_command
def main(argv: list[str]) -> None:
    """Parse the arguments, time the programs, print the JSON line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EPILOG)
    parser.add_argument("--rows", type=int, default=20, help="MBPP rows (reference + wrong solution each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    args = parser.parse_args(argv)
    print(machine_header("sandbox overhead", {}))
    rows, _ = load_prompts(default_prompt_file(), tasks=["Coding"], datasets=["mbpp"], limit=args.rows)
    right = [_dialogue(row.instruction, row.meta["canonical_solution"]) for row in rows]
    wrong = [_dialogue(row.instruction, f"def {row.meta['entry_point']}(*args):\n    return None") for row in rows]
    empty, mbpp = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for _ in range(len(rows)):
            run_python("pass")
        empty.append((time.perf_counter() - started) / len(rows))
        reward = CodeTestReward(workers=1)
        started = time.perf_counter()
        scores = reward.score(right + wrong, rows + rows)
        mbpp.append((time.perf_counter() - started) / (2 * len(rows)))
        if scores != [1.0] * len(rows) + [0.0] * len(rows):
            print(f"reference/wrong MBPP solutions scored {scores} ({dict(reward.outcomes)})", file=sys.stderr)
            sys.exit(1)
    report = {"isolation": isolation_level(), "rows": len(rows), "repeats": args.repeats}
    report |= {"empty_program_s": statistics.median(empty), "mbpp_program_s": statistics.median(mbpp)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
