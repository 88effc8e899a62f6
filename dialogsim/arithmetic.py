"""Arithmetic dialogues: multi-turn prompts inside a small model's reach, with an exact reference at every turn.

Turn 1 asks one operation on two numbers ("What is 7 times 8?"); each follow-up operates on the previous
result ("Now add 17 to that.", "Multiply that by 3."), so a wrong answer at turn h makes every later answer
wrong, and every turn has its exact reference. Every user turn ends with the Math_CoT header's format request
("Present your final answer as \\boxed{Your Answer}."), since the reward checks the format at each turn.
The follow-ups are replayed by :class:`dialogsim.user.ReplayedUser` (``--user_template replay``) and
:class:`dialogsim.rewards.turn_answer.TurnAnswerReward` (``--reward turn_answer``) scores the answer of the
dialogue's last turn against that turn's reference.

Measured on SmolLM2-135M-Instruct (temperature 0.8, 96 new tokens, 4 samples × 64 prompts; issue 26): "What is
a times b?" with a, b in 2..9 is answered correctly 43 % of the time, "What is a + b?" with a, b in 10..99 12 %:
the default turn-1 operations and ranges.

Rows are in the project's prompt schema (``data/README.md``), so every command reads them unchanged::

    {"id": "arithmetic-3f2a…", "task": "Math_CoT", "dataset": "arithmetic", "split": "train",
     "instruction": "What is 7 times 8? Present your final answer as \\boxed{Your Answer}.", "reference": "56",
     "meta": {"follow_ups": ["Now add 17 to that. Present …", "Multiply that by 3. Present …"],
              "turn_references": ["56", "73", "219"]}}

``reference`` is turn 1's answer (the answer to the row's instruction). A dialogue's question is its whole
script (:func:`~dialogsim.prompts.question_key`: the instruction and the follow-ups); the training rows
(``split`` ``"train"``) and the held-out rows (``"test"``) share no question. With the default ranges there are
only 64 turn-1 products, so turn-1 questions repeat across the two sets; the scripts do not.

    python -m dialogsim.arithmetic --output runs/arithmetic/prompts.jsonl   # 5,000 train + 500 held-out, seed 0
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser

from dialogsim.console import UsageError, console_command
from dialogsim.prompts import FOLLOW_UPS, TURN_REFERENCES, PromptRow, question_key

FORMAT_REQUEST = "Present your final answer as \\boxed{Your Answer}."  # the Math_CoT header's request
TASK = "Math_CoT"
DATASET = "arithmetic"
TRAIN_SPLIT, HELDOUT_SPLIT = "train", "test"


@dataclass(frozen=True)
class Operation:
    """One arithmetic operation, as a turn-1 question and as a follow-up on the previous result.

    Attributes:
        name: the name used in the settings (``add``, ``subtract``, ``multiply``).
        question: turn-1 text with ``{a}`` and ``{b}``.
        follow_up: follow-up text with ``{k}``; "that" is the previous turn's result.
        apply: the operation on integers.
    """

    name: str
    question: str
    follow_up: str
    apply: Callable[[int, int], int]


OPERATIONS = {
    operation.name: operation
    for operation in (
        Operation("add", "What is {a} + {b}?", "Now add {k} to that.", operator.add),
        Operation("subtract", "What is {a} - {b}?", "Now subtract {k} from that.", operator.sub),
        Operation("multiply", "What is {a} times {b}?", "Multiply that by {k}.", operator.mul),
    )
}


@dataclass
class ArithmeticConfig:
    """The generator's settings (the ``python -m dialogsim.arithmetic`` flags). Ranges are ``[low, high]``,
    both included; each turn's operation is drawn uniformly from its list, then its operands uniformly."""

    output: str = field(default="runs/arithmetic/prompts.jsonl", metadata={"help": "JSON Lines file to write"})
    train_dialogues: int = field(default=5000, metadata={"help": "training rows (split 'train')"})
    heldout_dialogues: int = field(default=500, metadata={"help": "held-out rows (split 'test'), no shared question"})
    follow_ups: int = field(default=2, metadata={"help": "follow-ups per dialogue: turns 2..1+follow_ups (H ≤ 5)"})
    first_operations: list[str] = field(
        default_factory=lambda: ["multiply", "add"], metadata={"help": "turn-1 operations (add, subtract, multiply)"}
    )
    add_operands: list[int] = field(default_factory=lambda: [10, 99], metadata={"help": "turn-1 a, b of add"})
    subtract_operands: list[int] = field(default_factory=lambda: [10, 99], metadata={"help": "turn-1 a, b of subtract"})
    multiply_operands: list[int] = field(default_factory=lambda: [2, 9], metadata={"help": "turn-1 a, b of multiply"})
    follow_up_operations: list[str] = field(
        default_factory=lambda: ["add", "multiply"], metadata={"help": "follow-up operations (add, subtract, multiply)"}
    )
    follow_up_add: list[int] = field(default_factory=lambda: [2, 20], metadata={"help": "k of 'Now add k to that.'"})
    follow_up_subtract: list[int] = field(default_factory=lambda: [2, 20], metadata={"help": "k of subtract"})
    follow_up_multiply: list[int] = field(
        default_factory=lambda: [2, 3], metadata={"help": "k of 'Multiply that by k.'"}
    )
    seed: int = field(default=0, metadata={"help": "the same seed and settings write the same file"})

    def __post_init__(self) -> None:
        for name in ("first_operations", "follow_up_operations"):
            unknown = sorted(set(getattr(self, name)) - set(OPERATIONS))
            if unknown or not getattr(self, name):
                raise UsageError(f"{name} must name some of {sorted(OPERATIONS)}, got {getattr(self, name)}")
        for name in ("add_operands", "subtract_operands", "multiply_operands", *_FOLLOW_UP_RANGES.values()):
            low_high = getattr(self, name)
            if len(low_high) != 2 or low_high[0] > low_high[1]:
                raise UsageError(f"{name} must be [low, high] with low <= high, got {low_high}")
        if not 0 <= self.follow_ups <= 4:
            raise UsageError(f"follow_ups must be in 0..4 (horizon H = 1 + follow_ups <= 5), got {self.follow_ups}")
        if self.train_dialogues < 1 or self.heldout_dialogues < 0:
            raise UsageError("train_dialogues must be >= 1 and heldout_dialogues >= 0")

    def first_range(self, operation: str) -> tuple[int, int]:
        """[low, high] of turn-1 operands a, b of ``operation``."""
        low, high = getattr(self, f"{operation}_operands")
        return low, high

    def follow_up_range(self, operation: str) -> tuple[int, int]:
        """[low, high] of the follow-up operand k of ``operation``."""
        low, high = getattr(self, _FOLLOW_UP_RANGES[operation])
        return low, high

    def question_count(self, first_operation: str) -> int:
        """How many distinct dialogues (scripts) these settings can write that open with ``first_operation``."""
        step = sum(_size(self.follow_up_range(name)) for name in set(self.follow_up_operations))
        return _size(self.first_range(first_operation)) ** 2 * step**self.follow_ups


_FOLLOW_UP_RANGES = {"add": "follow_up_add", "subtract": "follow_up_subtract", "multiply": "follow_up_multiply"}


@dataclass(frozen=True)
class Script:
    """One dialogue's user turns and the exact result after each.

    Attributes:
        user_turns: the user messages of turns 1..H (format request included).
        references: the exact result after turn h, for h = 1..H, as integers written in decimal.
    """

    user_turns: tuple[str, ...]
    references: tuple[str, ...]


def draw_script(config: ArithmeticConfig, first_operation: str, rng: np.random.Generator) -> Script:
    """One dialogue: a turn-1 ``first_operation`` question and ``config.follow_ups`` follow-ups, each drawn as the
    config says (the operation uniformly from ``follow_up_operations``, then its operand uniformly)."""
    first = OPERATIONS[first_operation]
    low, high = config.first_range(first.name)
    a, b = (int(value) for value in rng.integers(low, high + 1, size=2))
    result = first.apply(a, b)
    turns, references = [first.question.format(a=a, b=b)], [result]
    for _ in range(config.follow_ups):
        step = OPERATIONS[config.follow_up_operations[int(rng.integers(len(config.follow_up_operations)))]]
        low, high = config.follow_up_range(step.name)
        k = int(rng.integers(low, high + 1))
        result = step.apply(result, k)
        turns.append(step.follow_up.format(k=k))
        references.append(result)
    return Script(tuple(f"{turn} {FORMAT_REQUEST}" for turn in turns), tuple(str(value) for value in references))


def script_row(script: Script, split: str) -> PromptRow:
    """The prompt row of a script; its id is a hash of the script, so the same dialogue always has the same id."""
    digest = hashlib.sha256("\n".join(script.user_turns).encode()).hexdigest()[:16]
    return PromptRow(
        id=f"{DATASET}-{digest}",
        task=TASK,
        dataset=DATASET,
        instruction=script.user_turns[0],
        reference=script.references[0],
        split=split,
        meta={FOLLOW_UPS: list(script.user_turns[1:]), TURN_REFERENCES: list(script.references)},
    )


def generate(config: ArithmeticConfig) -> list[PromptRow]:
    """The training rows, then the held-out rows: distinct questions, deterministic given ``config``.

    Each entry of ``first_operations`` opens an equal share of each set (the first entries take the remainder;
    list an operation twice to double its share). Per entry, scripts are drawn with
    ``numpy.random.default_rng(config.seed)`` until its share of distinct questions
    (:func:`~dialogsim.prompts.question_key`) is reached; the first of them are held out, so no question is in
    both sets. Each set is then shuffled. Drawing per entry keeps the shares exact: an operation with fewer
    possible questions (64 products against 8,100 sums) repeats more often, and a pooled draw that skipped repeats
    would under-represent it.

    Raises:
        UsageError: the settings allow fewer than twice as many questions as an operation's share (drawing would
            slow down near exhaustion); widen the ranges, add operations or follow-ups, or ask for fewer rows.
    """
    count = len(config.first_operations)
    heldout_shares, train_shares = (
        _shares(total, count) for total in (config.heldout_dialogues, config.train_dialogues)
    )
    wanted: Counter[str] = Counter()
    for name, heldout_share, train_share in zip(config.first_operations, heldout_shares, train_shares, strict=True):
        wanted[name] += heldout_share + train_share
    for name, count in wanted.items():
        if 2 * count > config.question_count(name):
            raise UsageError(
                f"{count} dialogues opening with {name} requested but the settings allow only "
                f"{config.question_count(name)} distinct questions (need at least twice as many); widen the operand "
                "ranges, add operations or follow-ups, or ask for fewer dialogues"
            )
    rng = np.random.default_rng(config.seed)
    seen: set[str] = set()
    heldout: list[PromptRow] = []
    train: list[PromptRow] = []
    for name, heldout_share, train_share in zip(config.first_operations, heldout_shares, train_shares, strict=True):
        scripts: list[Script] = []
        while len(scripts) < heldout_share + train_share:
            script = draw_script(config, name, rng)
            key = question_key(script_row(script, TRAIN_SPLIT))
            if key not in seen:
                seen.add(key)
                scripts.append(script)
        heldout += [script_row(script, HELDOUT_SPLIT) for script in scripts[:heldout_share]]
        train += [script_row(script, TRAIN_SPLIT) for script in scripts[heldout_share:]]
    return [train[i] for i in rng.permutation(len(train))] + [heldout[i] for i in rng.permutation(len(heldout))]


def _shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers, the first ones larger by the remainder."""
    return [total // parts + (index < total % parts) for index in range(parts)]


def write_rows(rows: Sequence[PromptRow], path: Path) -> None:
    """Write ``rows`` as JSON Lines (one prompt row per line, keys in the schema's order), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    with staging.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
    staging.replace(path)


def _size(low_high: tuple[int, int]) -> int:
    return low_high[1] - low_high[0] + 1


@console_command
def main(argv: Sequence[str]) -> None:
    """``python -m dialogsim.arithmetic [--output FILE] [--seed N] ...``: write the rows, print a summary.

    Settings the generator cannot satisfy are refused with one ``error:`` line and exit status 2
    (:func:`~dialogsim.console.console_command`), before anything is written.
    """
    (config,) = HfArgumentParser(ArithmeticConfig).parse_args_into_dataclasses(args=list(argv))
    rows = generate(config)
    write_rows(rows, Path(config.output))
    digest = hashlib.sha256(Path(config.output).read_bytes()).hexdigest()
    print(
        f"wrote {config.output}: {config.train_dialogues} training + {config.heldout_dialogues} held-out dialogues of "
        f"H = {1 + config.follow_ups} turns; sha256 {digest}"
    )


if __name__ == "__main__":
    main()
