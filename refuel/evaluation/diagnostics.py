"""Per-turn diagnostics of each policy's own dialogues, independent of the pairwise judge.

A win rate says which of two dialogues a judge preferred, not why. These diagnostics read each policy's
cached dialogues alone (the ``refuel-evaluate`` dialogue files; nothing is generated) and report, per policy and
turn h = 1..H, over the dialogues that have an assistant reply at turn h:

* ``reward``: mean score of the dialogue truncated at h by the evaluation's reward model; NaN scores are left
  out of the mean and counted in ``reward_nan``.
* ``accuracy`` (%, Math rows with a ``reference``, and rows with per-turn references): the dialogue's final answer
  up to turn h (:func:`~dialogsim.rewards.math_reward.dialogue_final_answer` of the replies 1..h, the reward's own
  extraction) matches the reference (:func:`~dialogsim.rewards.math_verifier.answers_match`). A row with a
  reference per turn (``meta["turn_references"]``, the arithmetic dialogues) is scored at every turn h on the
  turn-h reply against turn h's reference (:func:`~dialogsim.rewards.turn_answer.turn_answer_correct`, as the
  ``turn_answer`` reward does at the last turn).
* ``pass_rate`` (%, Coding rows with tests): the row's reference tests pass on the latest code of the replies
  1..h (:class:`~dialogsim.rewards.code_verifier.CodeTestReward`, sandboxed); NaN when no Coding row is
  evaluated.
* ``format_rate`` (%): the turn-h reply follows the answer format the instruction requests. Recognised
  requests (:data:`ANSWER_FORMATS`): an instruction containing ``\\boxed{`` (the Math_CoT prompts' "Present
  your final answer as \\boxed{Your Answer}.") asks for a ``\\boxed{...}`` with non-blank content in the reply;
  an instruction saying "Present code in ```python```" (the Coding prompts) asks for a fenced Python block as
  the code verifier reads it (```` ```python ````, ```` ```py ```` or a bare ```` ``` ```` fence; an
  unterminated last fence counts, as for a reply cut at the token cap). Rows whose instruction requests
  neither (e.g. the Logic prompts) are left out of the rate's denominator.
* ``reply_tokens``: mean length of the turn-h reply in tokens of the policy's tokenizer (no special tokens). The
  cached dialogues hold text, not the generated ids, so this is the length of the re-encoded text; it can exceed
  the generated count (and the ``max_new_tokens`` cap) when the policy sampled a non-canonical token sequence.
* ``copy_rate`` (%): the turn-h reply copies the prompt: at least :data:`COPY_THRESHOLD` of its word
  :data:`~dialogsim.rewards.math_format.COPY_NGRAM`-grams occur in the instruction
  (:func:`~dialogsim.rewards.math_format.copy_rate`; a verbatim copy scores 1).
* ``fallback_rate`` (%): the user turn that follows the turn-h reply is the simulated user's documented
  :data:`~dialogsim.user.FALLBACK_QUESTION` (its question could not be parsed); over the dialogues that have a
  user turn after the turn-h reply, so NaN at h = H.

Counts beside the rates give each denominator: ``dialogues`` (replies at turn h), ``reward_nan``,
``math_dialogues``, ``coding_dialogues`` (judged programs; sandbox failures excluded), ``format_dialogues`` and
``user_turns``. Rates are percentages (0-100), as in :mod:`refuel.evaluation.winrate`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import PreTrainedTokenizerBase

from dialogsim.messages import Message, truncate_to_turn
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import RewardModel
from dialogsim.rewards.code_verifier import CODE_TASK, CodeTestReward, extract_code
from dialogsim.rewards.factory import MATH_TASK_PREFIX
from dialogsim.rewards.math_format import copy_rate
from dialogsim.rewards.math_reward import dialogue_final_answer
from dialogsim.rewards.math_verifier import answers_match, last_boxed
from dialogsim.rewards.turn_answer import turn_answer_correct
from dialogsim.user import FALLBACK_QUESTION
from refuel.storage import atomic_path

COPY_THRESHOLD = 0.5


@dataclass(frozen=True)
class AnswerFormat:
    """An answer format a prompt can request.

    Attributes:
        name: short label, e.g. ``"boxed"``.
        request: matches an instruction that requests this format.
        followed: whether a reply follows it.
    """

    name: str
    request: re.Pattern[str]
    followed: Callable[[str], bool]


ANSWER_FORMATS = (
    AnswerFormat("boxed", re.compile(r"\\boxed\{"), lambda reply: last_boxed(reply) is not None),
    AnswerFormat(
        "python_block",
        re.compile(r"present (?:your )?code in ```python", re.IGNORECASE),
        lambda reply: extract_code(reply) is not None,
    ),
)


@dataclass(frozen=True)
class TurnDiagnostics:
    """The diagnostics of one policy at one turn h (see the module docstring for each field's definition).

    Attributes:
        method: the policy's method name.
        turn: h, 1-based.
        dialogues: dialogues with an assistant reply at turn h (the denominator of reply-level rates).
        reward: mean reward of the dialogues truncated at h (reward-model units), NaN scores left out.
        reward_nan: dialogues whose reward was NaN.
        accuracy: % of Math dialogues whose final answer up to h matches the reference (turn h's reference for
            rows with per-turn references).
        math_dialogues: Math dialogues with a reference (with a turn-h reference, for rows with per-turn ones).
        pass_rate: % of Coding dialogues whose latest code up to h passes the reference tests.
        coding_dialogues: Coding dialogues whose tests ran.
        format_rate: % of turn-h replies that follow the format their instruction requests.
        format_dialogues: dialogues whose instruction requests a recognised format.
        reply_tokens: mean turn-h reply length (policy tokenizer, tokens).
        copy_rate: % of turn-h replies that copy the instruction.
        fallback_rate: % of the user turns after the turn-h reply that are the fallback question.
        user_turns: dialogues with a user turn after the turn-h reply.
    """

    method: str
    turn: int
    dialogues: int
    reward: float
    reward_nan: int
    accuracy: float
    math_dialogues: int
    pass_rate: float
    coding_dialogues: int
    format_rate: float
    format_dialogues: int
    reply_tokens: float
    copy_rate: float
    fallback_rate: float
    user_turns: int


DIAGNOSTIC_COLUMNS = tuple(field.name for field in fields(TurnDiagnostics))
# The plotted diagnostics: column → (axis title, whether it is a percentage); their denominators are in the CSV.
PANELS = {
    "reward": ("mean reward", False),
    "accuracy": ("final-answer accuracy (%)", True),
    "pass_rate": ("test pass rate (%)", True),
    "format_rate": ("requested format followed (%)", True),
    "reply_tokens": ("reply length (tokens)", False),
    "copy_rate": ("replies copying the prompt (%)", True),
    "fallback_rate": ("user fallback questions (%)", True),
}


def requested_format(instruction: str) -> AnswerFormat | None:
    """The first of :data:`ANSWER_FORMATS` whose request matches ``instruction``; ``None`` if none does."""
    return next((answer_format for answer_format in ANSWER_FORMATS if answer_format.request.search(instruction)), None)


def policy_diagnostics(
    method: str,
    dialogues: Mapping[str, list[Message]],
    rows: Mapping[str, PromptRow],
    horizon: int,
    *,
    reward: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    code_tests: CodeTestReward | None = None,
) -> list[TurnDiagnostics]:
    """The diagnostics of one policy's dialogues at every turn h = 1..H.

    Args:
        method: the policy's method name, copied into each record.
        dialogues: prompt id → the policy's complete dialogue on that prompt.
        rows: prompt id → prompt row (instruction, task, reference); must hold every id of ``dialogues``.
        horizon: H; a turn that no dialogue reached gets a record with ``dialogues == 0`` and NaN rates.
        reward: scores every truncated dialogue, in one ``score`` call.
        tokenizer: the policy's tokenizer, for ``reply_tokens``.
        code_tests: runs the Coding rows' tests (one ``score`` call; default: a :class:`CodeTestReward`);
            unused when no Coding row is present.

    Returns:
        One :class:`TurnDiagnostics` per turn, h ascending.

    Raises:
        KeyError: a dialogue's prompt id is not in ``rows``.
        ValueError: ``horizon`` < 1.
    """
    if horizon < 1:
        raise ValueError(f"policy_diagnostics({method!r}): horizon must be >= 1, got {horizon}")
    missing = sorted(set(dialogues) - set(rows))
    if missing:
        raise KeyError(f"policy_diagnostics({method!r}): no prompt row for prompt ids {missing[:5]}")
    replies = _reply_frame(dialogues, rows, horizon, reward, tokenizer, code_tests or CodeTestReward())
    return [_turn_record(method, turn, replies[replies["turn"] == turn]) for turn in range(1, horizon + 1)]


def _reply_frame(
    dialogues: Mapping[str, list[Message]],
    rows: Mapping[str, PromptRow],
    horizon: int,
    reward: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    code_tests: CodeTestReward,
) -> pd.DataFrame:
    """One row per (prompt, turn) reply: per-reply values, NaN where a diagnostic does not apply."""
    values, truncations = [], []
    for prompt_id, messages in dialogues.items():
        replies = [message["content"] for message in messages if message["role"] == "assistant"]
        users = [message["content"] for message in messages if message["role"] == "user"]
        row = rows[prompt_id]
        answer_format = requested_format(row.instruction)
        for turn in range(1, min(horizon, len(replies)) + 1):
            reply = replies[turn - 1]
            values.append(
                {
                    "prompt_id": prompt_id,
                    "turn": turn,
                    "reply": reply,
                    "correct": _correct(replies[:turn], row),
                    "follows_format": math.nan if answer_format is None else float(answer_format.followed(reply)),
                    "copied": float(copy_rate(reply, row.instruction) >= COPY_THRESHOLD),
                    "fallback": float(users[turn] == FALLBACK_QUESTION) if turn < len(users) else math.nan,
                }
            )
            truncations.append((truncate_to_turn(messages, turn), row))
    frame = pd.DataFrame(
        values, columns=["prompt_id", "turn", "reply", "correct", "follows_format", "copied", "fallback"]
    )
    frame["reward"] = reward.score([d for d, _ in truncations], [r for _, r in truncations]) if truncations else []
    coding = [index for index, (_, row) in enumerate(truncations) if row.task == CODE_TASK]
    frame["passed"] = math.nan
    if coding:
        scores = code_tests.score([truncations[i][0] for i in coding], [truncations[i][1] for i in coding])
        frame.loc[coding, "passed"] = scores
    lengths = tokenizer(frame["reply"].tolist(), add_special_tokens=False)["input_ids"] if len(frame) else []
    frame["reply_tokens"] = [len(ids) for ids in lengths]
    return frame


def _correct(replies: list[str], row: PromptRow) -> float:
    """1.0 / 0.0 whether the answer up to turn h = ``len(replies)`` is right, NaN where no reference says.

    Against turn h's reference (the turn-h reply's answer) for a row with per-turn references, NaN past them;
    else against a Math row's reference (the final answer of ``replies``); NaN for other rows.
    """
    if row.turn_references:
        turn = len(replies)
        if turn > len(row.turn_references):
            return math.nan
        return float(turn_answer_correct(replies[-1], row.turn_references[turn - 1]))
    if not row.task.startswith(MATH_TASK_PREFIX) or row.reference is None:
        return math.nan
    answer = dialogue_final_answer(replies)
    return float(answer is not None and answers_match(answer, row.reference))


def _turn_record(method: str, turn: int, replies: pd.DataFrame) -> TurnDiagnostics:
    """Aggregate the per-reply rows of one turn; rates in percent, NaN where nothing applies."""
    values = replies[["reward", "correct", "passed", "follows_format", "reply_tokens", "copied", "fallback"]]
    values = values.astype(float)
    means, counts = values.mean(), values.count()  # NaN left out of both
    return TurnDiagnostics(
        method=method,
        turn=turn,
        dialogues=len(replies),
        reward=float(means["reward"]),
        reward_nan=int(len(replies) - counts["reward"]),
        accuracy=100 * float(means["correct"]),
        math_dialogues=int(counts["correct"]),
        pass_rate=100 * float(means["passed"]),
        coding_dialogues=int(counts["passed"]),
        format_rate=100 * float(means["follows_format"]),
        format_dialogues=int(counts["follows_format"]),
        reply_tokens=float(means["reply_tokens"]),
        copy_rate=100 * float(means["copied"]),
        fallback_rate=100 * float(means["fallback"]),
        user_turns=int(counts["fallback"]),
    )


def diagnostics_frame(records: Iterable[TurnDiagnostics]) -> pd.DataFrame:
    """The records as a frame, one row per (method, turn), columns :data:`DIAGNOSTIC_COLUMNS`."""
    return pd.DataFrame([asdict(record) for record in records], columns=list(DIAGNOSTIC_COLUMNS))


def save_diagnostics(frame: pd.DataFrame, out_dir: Path, title: str) -> dict[str, Path]:
    """Write the diagnostics table and plot into ``out_dir``, each file atomically.

    Args:
        frame: output of :func:`diagnostics_frame`.
        out_dir: folder to write into; created if missing.
        title: the plot's overall title.

    Returns:
        ``{"diagnostics": out_dir / "diagnostics.csv", "diagnostics_png": out_dir / "diagnostics.png"}``. The CSV
        is ``frame`` unchanged (no index). The PNG has one panel per diagnostic of :data:`PANELS` (x = turn h,
        one line per method); a panel without any value (e.g. the pass rate on Math prompts) says so.

    Raises:
        ValueError: ``frame`` lacks some of :data:`DIAGNOSTIC_COLUMNS`.
    """
    missing = [column for column in DIAGNOSTIC_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"save_diagnostics: frame is missing columns {missing}; build it with diagnostics_frame")
    paths = {"diagnostics": Path(out_dir) / "diagnostics.csv", "diagnostics_png": Path(out_dir) / "diagnostics.png"}
    with atomic_path(paths["diagnostics"]) as staging:
        frame.to_csv(staging, index=False)
    with atomic_path(paths["diagnostics_png"]) as staging:
        _plot(frame, title).savefig(staging, format="png", dpi=110)
    return paths


def _plot(frame: pd.DataFrame, title: str) -> Figure:
    """One panel per diagnostic, value vs turn h, one line per method, on an Agg canvas."""
    columns = 4
    panel_rows = math.ceil(len(PANELS) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.8 * panel_rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(panel_rows, columns, squeeze=False).ravel()
    methods = pd.unique(frame["method"])
    for axes, (column, (label, percent)) in zip(grid, PANELS.items(), strict=False):
        for method in methods:
            of_method = frame[frame["method"] == method]
            axes.plot(of_method["turn"], of_method[column], marker="o", label=str(method))
        if frame[column].isna().all():
            axes.text(0.5, 0.5, "no applicable rows", ha="center", va="center", transform=axes.transAxes)
        axes.set(xlabel="turn h", title=label)
        if percent:
            axes.set_ylim(-4, 104)
        axes.set_xticks(np.sort(frame["turn"].unique()))
    legend_axes = grid[len(PANELS)] if len(grid) > len(PANELS) else grid[0]
    for axes in grid[len(PANELS) :]:
        axes.set_axis_off()
    legend_axes.legend(*grid[0].get_legend_handles_labels(), loc="center", title="policy")
    figure.suptitle(title)
    return figure
