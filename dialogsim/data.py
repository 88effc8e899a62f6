"""Load UltraInteract-format prompts as :class:`~dialogsim.prompts.PromptRow` lists.

Data format: openbmb/UltraInteract (https://huggingface.co/datasets/openbmb/UltraInteract_sft,
https://github.com/OpenBMB/Eurus). Three row schemas are read, one row per prompt:

- prompt format (the shared ``prompts.jsonl``): ``id, task, dataset, split, source_id, instruction,
  reference, meta``;
- ``UltraInteract_sft``: ``task, dataset, instruction, response, id, parent_id``;
- ``UltraInteract_pair``: ``task, dataset, trajectory, chosen, rejected, id, parent_id``; the
  instruction is the first ``{"from": "user"}`` turn of ``trajectory``.

Fields other than ``id, task, dataset, instruction, reference, split, meta`` go into ``PromptRow.meta``
(null values are dropped there, since Arrow fills keys missing from a row with null). A row may script its
later user turns in ``meta``: ``follow_ups`` (the user messages of turns 2, 3, …) and ``turn_references`` (the
gold answer of every turn), see :mod:`dialogsim.prompts`; both are checked here.
Sources are local ``.jsonl`` / ``.json`` / ``.parquet`` files, local dataset folders and hub dataset
ids, all read through :func:`datasets.load_dataset`, so caching is the ``datasets`` cache.

Offline dialogues (the reset states of dataset resets, :func:`load_offline_dialogues`) come through the
same machinery from any source with a list of chat messages per row: a ``messages`` column of
``{"role", "content"}`` dicts (common chat datasets), or UltraInteract_pair's multi-turn ``trajectory``
of ``{"from", "value"}`` turns. Each is mapped to a prompt row the simulator knows (see there).

The default prompt set (:func:`default_prompt_source`) is the shared file, else, online, the hub dataset
``openbmb/UltraInteract_sft`` read with the same filters. Which rows a simulator, a command or an adapter runs on
is one :class:`PromptConfig` and :func:`load_prompt_rows` (its held-out partition by id hash). The cards of every
prompt set are in ``data/README.md``.

>>> rows, report = load_prompts(default_prompt_source(), tasks=["Math_CoT"], datasets=["gsm8k"])
>>> train, evaluation = split_train_eval(rows, eval_fraction=0.1, seed=0)
>>> heldout, report = load_prompt_rows(PromptConfig(holdout=64), tokenizer, "heldout")  # doctest: +SKIP
>>> dialogues, report = load_offline_dialogues("openbmb/UltraInteract_pair", rows)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from datasets import config as datasets_config
from datasets import load_dataset

from dialogsim.console import UsageError
from dialogsim.messages import ROLES, Message, MessageFormatError, count_turns, validate_messages
from dialogsim.prompts import FOLLOW_UPS, TURN_REFERENCES, OfflineDialogue, PromptRow, instruction_key, question_key
from dialogsim.rewards.math_verifier import last_boxed
from dialogsim.settings import AT_LEAST_ONE, NON_NEGATIVE, Rule, check_settings, setting

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class PromptsNotFoundError(UsageError):
    """The prompt source names no file, folder or hub dataset (or none is given and the default is missing):
    a refusal before anything is generated (commands exit 2 with its message, :mod:`dialogsim.console`)."""


logger = logging.getLogger(__name__)

PROMPTS_ENV_VAR = "DIALOGSIM_PROMPTS"
SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrainteract" / "prompts.jsonl"
HUB_PROMPTS = "openbmb/UltraInteract_sft"
HUB_SPLIT = "train"
ALL = "all"  # a filter list of just this word keeps every value
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REQUIRED_TEXT_FIELDS = ("id", "task", "dataset")
OPTIONAL_TEXT_FIELDS = ("reference", "split")
ROW_FIELDS = frozenset({"id", "task", "dataset", "instruction", "reference", "split", "meta"})
TOKENIZE_BATCH = 256
EXAMPLE_ROW = '{"id": "q1", "task": "Math_CoT", "dataset": "gsm8k", "instruction": "What is 2+2?", "reference": "4"}'
EXAMPLE_DIALOGUE = (
    '{"id": "d1", "messages": [{"role": "user", "content": "What is 2+2?"}, '
    '{"role": "assistant", "content": "5"}, {"role": "user", "content": "Are you sure?"}]}'
)
DIALOGUE_COLUMNS = ("messages", "trajectory")
PROMPT_DROPS = (
    ("task", "filtered_task"),
    ("dataset", "filtered_dataset"),
    ("split", "filtered_split"),
    ("duplicate", "duplicate"),
    ("over token budget", "over_token_budget"),
    ("over limit", "over_limit"),
)
DIALOGUE_DROPS = (
    ("malformed", "malformed"),
    ("roles not alternating", "roles_not_alternating"),
    ("empty", "empty"),
    ("duplicate", "duplicate"),
    ("no prompt row", "no_prompt_row"),
    ("over token budget", "over_token_budget"),
    ("over limit", "over_limit"),
)
INSTRUCTION_HELP = (
    "every row needs the user turn as a non-empty string 'instruction' (prompt format, UltraInteract_sft) "
    "or a 'trajectory' list whose first {'from': 'user'} turn holds it (UltraInteract_pair)"
)
_JSON_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')


class PromptFormatError(UsageError):
    """A prompt source breaks the UltraInteract row format; the message names the file, line or row, and field.

    A refused file, so commands exit 2 (:mod:`dialogsim.console`); a ``ValueError``.
    """


@dataclass
class LoadReport:
    """What :func:`load_prompts` or :func:`load_offline_dialogues` read, dropped (per reason, first
    reason wins) and kept.

    ``rows_read == rows_kept + dropped``, where ``dropped`` sums the reasons of the ``kind``:
    prompts: ``filtered_task, filtered_dataset, filtered_split, duplicate, over_token_budget,
    over_limit``; dialogues: ``malformed`` (not a list of ``{role, content}`` string messages with
    known roles), ``roles_not_alternating``, ``empty`` (no dialogue, no user message, or an empty
    message), ``duplicate`` (same messages as an earlier row), ``no_prompt_row`` (no prompt row of the
    simulator matches it), ``over_token_budget``, ``over_limit``.
    """

    source: str
    rows_read: int = 0
    filtered_task: int = 0
    filtered_dataset: int = 0
    filtered_split: int = 0
    duplicate: int = 0
    over_token_budget: int = 0
    over_limit: int = 0
    rows_kept: int = 0
    malformed: int = 0
    roles_not_alternating: int = 0
    empty: int = 0
    no_prompt_row: int = 0
    kind: str = "prompts"

    @property
    def dropped(self) -> int:
        """Rows dropped for any reason of this report's ``kind``."""
        return sum(getattr(self, name) for _, name in self._drops)

    @property
    def _drops(self) -> tuple[tuple[str, str], ...]:
        return DIALOGUE_DROPS if self.kind == "dialogues" else PROMPT_DROPS

    def __str__(self) -> str:
        reasons = ", ".join(f"{label} {getattr(self, name)}" for label, name in self._drops)
        return f"{self.source}: kept {self.rows_kept} of {self.rows_read} {self.kind} (dropped: {reasons})"


def default_prompt_file() -> Path:
    """The prompt file to use when none is given.

    Returns:
        ``$DIALOGSIM_PROMPTS`` if set, else the shared ``prompts.jsonl`` at
        ``<repo>/../shared/data/ultrainteract/`` (found relative to this package).

    Raises:
        PromptsNotFoundError: ``$DIALOGSIM_PROMPTS`` names no file, or it is unset and the shared file is absent.
    """
    configured = os.environ.get(PROMPTS_ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise PromptsNotFoundError(f"${PROMPTS_ENV_VAR} is set to {path}, which is not a file; fix or unset it")
        return path
    if SHARED_PROMPTS.is_file():
        return SHARED_PROMPTS
    raise PromptsNotFoundError(
        f"no prompt file: ${PROMPTS_ENV_VAR} is unset and {SHARED_PROMPTS} does not exist; pass a "
        ".jsonl/.json/.parquet file in UltraInteract format or a hub id (openbmb/UltraInteract_sft)"
    )


def default_prompt_source(shared: Path = SHARED_PROMPTS, offline: bool | None = None) -> Path | str:
    """The prompt set to use when none is given: a local file offline, the hub dataset online.

    In order: ``$DIALOGSIM_PROMPTS`` if set; else ``shared`` (the shared ``prompts.jsonl``) if it exists;
    else, unless offline, the hub id :data:`HUB_PROMPTS` (``openbmb/UltraInteract_sft``), which
    :func:`load_prompts` reads with the same filters (its rows get ``split="train"`` and, for Math
    tasks, the response's ``\\boxed{}`` answer as ``reference``; see :func:`_to_prompt_row`). Nothing
    is fetched here: a hub id is only named.

    Args:
        shared: the local default file.
        offline: whether the hub is off limits; ``None`` reads ``datasets.config.HF_HUB_OFFLINE``
            (set by ``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1``).

    Raises:
        PromptsNotFoundError: ``$DIALOGSIM_PROMPTS`` names no file, or offline with no ``shared`` file
            (the message says how to fix either).
    """
    if os.environ.get(PROMPTS_ENV_VAR):
        return default_prompt_file()
    if shared.is_file():
        return shared
    if offline is None:
        offline = datasets_config.HF_HUB_OFFLINE
    if offline:
        raise PromptsNotFoundError(
            f"no default prompts: {shared} does not exist and the hub is off (HF_HUB_OFFLINE / "
            f"HF_DATASETS_OFFLINE is set), so {HUB_PROMPTS} cannot be read; pass --prompts <file>, set "
            f"${PROMPTS_ENV_VAR}, put the shared data at {shared}, or unset the offline variables"
        )
    logger.info("%s does not exist; the default prompts are the hub dataset %s", shared, HUB_PROMPTS)
    return HUB_PROMPTS


def load_prompts(
    source: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_prompt_tokens: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
    cache_dir: str | None = None,
) -> tuple[list[PromptRow], LoadReport]:
    """Read, validate, filter and deduplicate UltraInteract-format prompts.

    Steps, in order: keep rows whose ``task`` / ``dataset`` / ``split`` is in the given lists; drop
    rows whose question repeats an earlier one (the instruction, and a scripted row's follow-ups, after NFKC,
    case folding and whitespace collapsing: :func:`~dialogsim.prompts.question_key`);
    drop rows whose chat-templated prompt (one user message plus the generation prompt, including any
    default system prompt of the template) is longer than ``max_prompt_tokens`` tokens; shuffle with
    ``seed``; keep the first ``limit`` rows. The report is logged at INFO.

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a local dataset folder, or a hub dataset
            id such as ``openbmb/UltraInteract_pair`` (split ``train``) in one of the schemas above.
        tasks: keep only these tasks, e.g. ``["Math_CoT"]``; ``None`` or ``["all"]`` keeps all.
        datasets: keep only these source datasets, e.g. ``["gsm8k"]``; ``None`` or ``["all"]`` keeps all.
        splits: keep only these source splits, e.g. ``["train"]``; ``None`` or ``["all"]`` keeps all.
        tokenizer: tokenizer with a chat template, used with ``max_prompt_tokens``.
        max_prompt_tokens: token budget of the templated prompt (tokens); needs ``tokenizer``.
        limit: keep at most this many rows (after everything else).
        seed: seed of the shuffle.
        shuffle: shuffle the kept rows (deterministic given ``seed``).
        cache_dir: ``datasets`` cache folder; ``None`` uses the ``datasets`` default.

    Returns:
        The kept rows and a :class:`LoadReport`.

    Raises:
        PromptsNotFoundError: ``source`` is neither a file, a folder nor a hub id.
        PromptFormatError: a row is malformed (message: file, 1-based line or 0-based row, field, fix),
            the source is empty, or two rows share an id.
        ConnectionError: a hub id could not be reached (offline).
        TypeError, ValueError: bad arguments, or no row is left after filtering.
    """
    _check_arguments(tasks=tasks, datasets=datasets, splits=splits, limit=limit, max_prompt_tokens=max_prompt_tokens)
    if max_prompt_tokens is not None and tokenizer is None:
        logger.warning("max_prompt_tokens=%d is ignored: no tokenizer was given", max_prompt_tokens)
    records, locate = _read_records(source, cache_dir)
    rows = _rows_from_records(records, locate)
    report = LoadReport(source=str(source), rows_read=len(rows))
    rows = _filter_fields(rows, {"task": tasks, "dataset": datasets, "split": splits}, report)
    rows = _dedupe(rows, report)
    if tokenizer is not None and max_prompt_tokens is not None:
        counts = prompt_token_counts([row.instruction for row in rows], tokenizer)
        rows = _within_budget(rows, counts, max_prompt_tokens, report)
    rows = _shuffle_and_limit(rows, seed if shuffle else None, limit, report)
    if not rows:
        raise ValueError(f"no prompts left: {report}; loosen tasks/datasets/splits or raise max_prompt_tokens")
    return rows, report


def load_offline_dialogues(
    source: str | Path,
    prompts: Sequence[PromptRow],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_dialogue_tokens: int | None = None,
    max_turns: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
    cache_dir: str | None = None,
) -> tuple[list[OfflineDialogue], LoadReport]:
    """Read offline dialogues (the reset states of dataset resets), each mapped to one of ``prompts``.

    Row schemas: a ``messages`` list of ``{"role", "content"}`` dicts (roles ``system`` / ``user`` /
    ``assistant``, as in common chat datasets), or UltraInteract_pair's ``trajectory`` list of
    ``{"from", "value"}`` turns. A row is kept when its messages are strings with known roles (else
    ``malformed``), alternate user / assistant from a user message after an optional leading system
    message (else ``roles_not_alternating``), and it has a user message and no empty message (else
    ``empty``). Each kept dialogue is cut after its last usable user message: the ``max_turns``-th if
    given (pass the simulator's ``max_horizon``), else the last one, so it ends with a user message.
    Then, in order: dialogues repeating an earlier one's messages are dropped (``duplicate``; pair
    datasets repeat a trajectory once per reply pair); each is mapped to a prompt row (else
    ``no_prompt_row``); the cut dialogue plus the generation prompt must fit ``max_dialogue_tokens``
    (else ``over_token_budget``); shuffle with ``seed``; keep the first ``limit``. Bad rows are counted
    in the report and skipped, never raised. The report is logged at INFO.

    Mapping to a prompt row (the reward scores a dialogue against its row's ``reference``): a dialogue
    belongs to the prompt row whose ``instruction`` is its first user message, compared by
    :func:`dialogsim.prompts.instruction_key` (NFKC, case and whitespace folded), the same rule by
    which :meth:`DialogueSimulator.new_state` accepts a prefix. So pass the simulator's prompt rows
    (``list(simulator.prompts.values())``); UltraInteract_pair trajectories match the rows of the same
    UltraInteract prompt. To use a chat dataset whose prompts are not in the prompt file, add its first
    user messages to the prompt file as rows (with references where the reward needs them).

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a local dataset folder or a hub dataset id
            (split ``train``), e.g. ``openbmb/UltraInteract_pair``.
        prompts: the prompt rows dialogues may belong to.
        tokenizer: the policy's tokenizer (chat template), used with ``max_dialogue_tokens``.
        max_dialogue_tokens: token budget of a cut dialogue (tokens); needs ``tokenizer``.
        max_turns: keep at most this many user messages per dialogue (the largest reset turn).
        limit: keep at most this many dialogues (after everything else).
        seed / shuffle: shuffle the kept dialogues, deterministically given ``seed``.
        cache_dir: ``datasets`` cache folder; ``None`` uses the ``datasets`` default.

    Returns:
        The kept dialogues (``id`` from the row's string ``id`` field, else ``row-<index>``; made
        unique with ``#<index>``) and a :class:`LoadReport` of kind ``"dialogues"``.

    Raises:
        PromptsNotFoundError: ``source`` is neither a file, a folder nor a hub id.
        PromptFormatError: the source is empty, not JSON objects (file, line), or has neither a
            ``messages`` nor a ``trajectory`` column.
        ConnectionError: a hub id could not be reached (offline).
        ValueError: bad sizes, or no dialogue is left.
    """
    _check_sizes(limit=limit, max_dialogue_tokens=max_dialogue_tokens, max_turns=max_turns)
    if max_dialogue_tokens is not None and tokenizer is None:
        logger.warning("max_dialogue_tokens=%d is ignored: no tokenizer was given", max_dialogue_tokens)
    records, locate = _read_records(source, cache_dir, DIALOGUE_ROWS)
    if not any(column in records[0] for column in DIALOGUE_COLUMNS):
        raise PromptFormatError(
            f"{locate(0)}: offline dialogues need a 'messages' column of {{role, content}} dicts or an "
            f"UltraInteract_pair 'trajectory' column; found columns {sorted(records[0])}; e.g. {EXAMPLE_DIALOGUE}"
        )
    report = LoadReport(source=str(source), rows_read=len(records), kind="dialogues")
    dialogues = _dialogues_from_records(records, prompts, max_turns, report)
    if tokenizer is not None and max_dialogue_tokens is not None:
        counts = chat_token_counts([d.messages for d in dialogues], tokenizer)
        dialogues = _within_budget(dialogues, counts, max_dialogue_tokens, report)
    dialogues = _shuffle_and_limit(dialogues, seed if shuffle else None, limit, report)
    if not dialogues:
        raise ValueError(f"no offline dialogues left: {report}; see LoadReport for what each reason means")
    return dialogues, report


def split_train_eval(
    rows: Sequence[PromptRow],
    eval_fraction: float | None = None,
    eval_count: int | None = None,
    seed: int = 0,
) -> tuple[list[PromptRow], list[PromptRow]]:
    """Split rows into disjoint train and eval lists by row id.

    A row goes to eval when the sha256 of ``f"{seed}:{id}"`` ranks among the ``eval_count`` smallest,
    so the split depends only on the ids and the seed (not on the row order). Both lists keep the
    input order.

    Args:
        rows: prompt rows with unique ids.
        eval_fraction: share of rows for eval, in (0, 1); the count is rounded. Give this or ``eval_count``.
        eval_count: number of rows for eval, in [1, len(rows) - 1].
        seed: seed of the split.

    Returns:
        ``(train, eval)``.

    Raises:
        ValueError: both or neither of ``eval_fraction`` / ``eval_count`` given, a size that leaves
            either side empty, or duplicate ids.
    """
    count = _eval_size(len(rows), eval_fraction, eval_count)
    ids = [row.id for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("split_train_eval needs unique row ids; load the rows with load_prompts, which checks them")
    ranked = sorted(ids, key=lambda row_id: hashlib.sha256(f"{seed}:{row_id}".encode()).digest())
    eval_ids = set(ranked[:count])
    return [row for row in rows if row.id not in eval_ids], [row for row in rows if row.id in eval_ids]


@dataclass
class PromptConfig:
    """Which prompt rows a simulator runs on: source, filters, token budget and the held-out partition
    (:func:`load_prompt_rows`). Shared by ``gym.make``, the commands and the adapters."""

    prompts: str | None = setting(
        None, help="prompt file (JSON Lines / Parquet) or hub id; default: the shared file", shapes="dialogues"
    )
    tasks: list[str] | None = setting(
        default_factory=lambda: ["Math_CoT"], help="UltraInteract tasks to keep ('all': every one)", shapes="dialogues"
    )
    datasets: list[str] | None = setting(
        default_factory=lambda: ["gsm8k"], help="source datasets to keep ('all': every one)", shapes="dialogues"
    )
    splits: list[str] | None = setting(
        default_factory=lambda: ["train"], help="source splits to keep ('all': every one)", shapes="dialogues"
    )
    holdout: int = setting(
        64,
        help="prompts reserved for evaluation, never trained on (the same value in refuel-train and refuel-evaluate)",
        shapes="dialogues",
        valid=NON_NEGATIVE,
    )
    max_prompt_tokens: int = setting(
        384, help="drop prompts longer than this (tokens)", shapes="dialogues", valid=AT_LEAST_ONE
    )

    rules: ClassVar[tuple[Rule, ...]] = ()
    """The combinations of fields a class's values must hold (a subclass with more fields has more rules)."""

    def __post_init__(self) -> None:
        """Check every field (type, declared range) and the class's :attr:`rules`; a ``prompts`` path given from
        Python (``gym.make(prompts=Path(...))``) becomes its string.

        Raises:
            UsageError: (a ``ValueError``) naming each bad field and what is valid
                (:func:`~dialogsim.settings.check_settings`).
        """
        if isinstance(self.prompts, os.PathLike):
            self.prompts = os.fspath(self.prompts)
        check_settings(self, self.rules)


PARTITIONS = ("all", "train", "heldout")


def load_prompt_rows(
    config: PromptConfig,
    tokenizer: PreTrainedTokenizerBase,
    partition: str = "all",
    limit: int | None = None,
) -> tuple[list[PromptRow], LoadReport]:
    """The prompt rows ``config`` selects, and the load report of the rows dropped by each filter.

    :func:`load_prompts` (filters, dedupe, the ``max_prompt_tokens`` budget counted with ``tokenizer``, the
    policy's), then :func:`select_partition` (``partition`` of :data:`PARTITIONS`), then the first ``limit`` rows.
    ``config.prompts=None`` is :func:`default_prompt_source`. Raises what those raise.
    """
    loaded, report = load_prompts(
        config.prompts if config.prompts is not None else default_prompt_source(),
        tasks=config.tasks,
        datasets=config.datasets,
        splits=config.splits,
        tokenizer=tokenizer,
        max_prompt_tokens=config.max_prompt_tokens,
    )
    return select_partition(loaded, config.holdout, partition)[:limit], report


def select_partition(rows: list[PromptRow], holdout: int, partition: str) -> list[PromptRow]:
    """The training rows, the ``holdout`` evaluation rows (:func:`split_train_eval` by id hash, seed 0, so training
    and evaluation agree on them without sharing state), or all rows.

    Raises:
        ValueError: ``partition`` not one of :data:`PARTITIONS`, or ``holdout`` missing for a split partition.
    """
    if partition == "all":
        return rows
    if partition not in PARTITIONS or holdout < 1:
        raise ValueError(f"partition must be 'all', 'train' or 'heldout' (with holdout >= 1); got {partition!r}")
    train, heldout = split_train_eval(rows, eval_count=holdout, seed=0)
    return train if partition == "train" else heldout


def _eval_size(total: int, eval_fraction: float | None, eval_count: int | None) -> int:
    """Number of eval rows out of ``total``; raises ValueError when a side would be empty."""
    if (eval_fraction is None) == (eval_count is None):
        raise ValueError("give exactly one of eval_fraction (e.g. 0.1) or eval_count (e.g. 100)")
    if eval_fraction is not None:
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        eval_count = round(eval_fraction * total)
    if not 1 <= eval_count <= total - 1:
        raise ValueError(
            f"{eval_count} eval rows out of {total} leaves train or eval empty; choose a size in [1, {total - 1}]"
        )
    return eval_count


def _check_arguments(
    *, tasks: object, datasets: object, splits: object, limit: int | None, max_prompt_tokens: int | None
) -> None:
    """Reject a bare string where a list of values is expected and non-positive sizes."""
    for name, values in (("tasks", tasks), ("datasets", datasets), ("splits", splits)):
        if isinstance(values, str):
            raise TypeError(f"{name} must be a list of strings, e.g. [{values!r}], not the string {values!r}")
    _check_sizes(limit=limit, max_prompt_tokens=max_prompt_tokens)


def _check_sizes(**sizes: int | None) -> None:
    """Raise ValueError for a size that is given and < 1."""
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")


# ---- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RowSchema:
    """How the reader pre-checks rows of a JSON file: ``check(record, where)`` raises
    PromptFormatError for a row that cannot be read at all; ``example`` is a valid row for messages."""

    check: Callable[[object, str], None]
    example: str


def _read_records(
    source: str | Path, cache_dir: str | None, schema: _RowSchema | None = None
) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    """Load raw rows with ``datasets`` and a function naming where row ``i`` came from.

    ``schema`` defaults to the prompt rows' (:data:`PROMPT_ROWS`).
    """
    schema = schema or PROMPT_ROWS
    if check_prompt_source(source) == "file":
        return _read_file(Path(source).expanduser(), cache_dir, schema)
    return _read_dataset(str(source), cache_dir)


def check_prompt_source(source: str | Path | None) -> str:
    """What kind of prompt source ``source`` is, without reading it: ``"file"``, ``"folder"`` or ``"hub"``.

    ``None`` stands for :func:`default_prompt_source`. Commands call it before anything is written or loaded.

    Raises:
        PromptsNotFoundError: ``source`` is neither an existing file or folder nor a hub dataset id (or ``None``
            and the default is missing); the message says what to pass.
    """
    source = default_prompt_source() if source is None else source
    path = Path(source).expanduser()
    if path.is_file():
        return "file"
    if path.is_dir():
        return "folder"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) is not None and path.suffix.lower() not in FILE_BUILDERS:
        return "hub"
    raise PromptsNotFoundError(
        f"prompt source {str(source)!r} is neither a file, a folder nor a hub dataset id; pass a "
        f".jsonl/.json/.parquet file (e.g. {SHARED_PROMPTS}) or a hub id (openbmb/UltraInteract_sft)"
    )


def _read_file(
    path: Path, cache_dir: str | None, schema: _RowSchema
) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    """Load a local file; JSON files are pre-validated first so that errors carry line numbers."""
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise PromptFormatError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
    locations = _prevalidate_json(path, schema) if builder == "json" else None
    records = load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir).to_list()
    if not records:
        raise PromptFormatError(f"{path}: the file holds no rows; expected rows such as {schema.example}")
    return records, (locations.__getitem__ if locations else partial(_row_location, str(path)))


def _read_dataset(name: str, cache_dir: str | None) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    """Load split ``train`` of a hub dataset id or a local dataset folder."""
    try:
        dataset = load_dataset(name, split=HUB_SPLIT, cache_dir=cache_dir)
    except ConnectionError as error:
        raise ConnectionError(f"{error}; offline, pass a local prompt file instead, e.g. {SHARED_PROMPTS}") from error
    records = dataset.to_list()
    if not records:
        raise PromptFormatError(f"{name} (split {HUB_SPLIT!r}) holds no rows")
    return records, partial(_row_location, f"{name} (split {HUB_SPLIT!r})")


def _row_location(source: str, index: int) -> str:
    return f"{source}, row {index} (0-based)"


# Whitespace as JSON defines it (RFC 8259); bytes.strip() would also drop \x0b and \x0c, which JSON readers reject.
JSON_WHITESPACE = b" \t\r\n"


def _prevalidate_json(path: Path, schema: _RowSchema | None = None) -> list[str]:
    """Check every row of a JSON Lines file (or JSON array); return each row's location, in order.

    ``schema`` defaults to the prompt rows' (:data:`PROMPT_ROWS`).
    """
    schema = schema or PROMPT_ROWS
    data = path.read_bytes()
    if not data.strip(JSON_WHITESPACE):
        raise PromptFormatError(f"{path}: the file is empty; expected one JSON object per line, e.g. {schema.example}")
    if data.lstrip(JSON_WHITESPACE)[:1] == b"[":
        return _prevalidate_array(path, data, schema)
    locations = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip(JSON_WHITESPACE):
            where = f"{path}, line {number}"
            schema.check(_parse_json(line, where, schema.example), where)
            locations.append(where)
    return locations


def _prevalidate_array(path: Path, data: bytes, schema: _RowSchema) -> list[str]:
    """Check a ``.json`` file holding one JSON array of rows; locations are 0-based element indices."""
    records = _parse_json(data, str(path), schema.example)
    if not isinstance(records, list) or not records:
        raise PromptFormatError(f"{path}: expected a non-empty JSON array of rows such as {schema.example}")
    locations = [f"{path}, element {index} (0-based)" for index in range(len(records))]
    for record, where in zip(records, locations, strict=True):
        schema.check(record, where)
    return locations


def _parse_json(raw: bytes, where: str, example: str = EXAMPLE_ROW) -> Any:
    """Decode UTF-8 and parse JSON, raising PromptFormatError with the column and the nearest field."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PromptFormatError(
            f"{where}: invalid UTF-8 bytes {raw[error.start : error.end].hex(' ')} at byte {error.start + 1}"
            f"{_field_with_bad_bytes(raw)}; re-save the file as UTF-8, "
            "e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        keys = _JSON_KEY.findall(text, 0, error.pos)
        near = f" after field {keys[-1]!r}" if keys else ""
        if "\n" in text.strip():
            position, fix = f"line {error.lineno}, column {error.colno}", "check quotes, commas and brackets"
        else:
            position, fix = (
                f"column {error.colno}",
                f"each row must be one complete JSON object on one line, e.g. {example}",
            )
        raise PromptFormatError(f"{where}: invalid JSON at {position}{near} ({error.msg}); {fix}") from None


def _field_with_bad_bytes(raw: bytes) -> str:
    """`` in field 'x'`` for the first top-level field holding undecodable bytes, or ``""``."""
    try:
        record = json.loads(raw.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError:
        return ""
    if not isinstance(record, dict):
        return ""
    for name, value in record.items():
        text = json.dumps({name: value}, ensure_ascii=False)
        if any("\udc80" <= char <= "\udcff" for char in text):
            return f" in field {name!r}"
    return ""


# ---- validation and conversion ----------------------------------------------------------------


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_record(record: object, where: str) -> None:
    """Raise PromptFormatError (what, where, how to fix) unless ``record`` is a valid prompt row."""
    if not isinstance(record, dict):
        raise PromptFormatError(
            f"{where}: expected a JSON object such as {EXAMPLE_ROW}, got a JSON {_json_type(record)}"
        )
    for name in REQUIRED_TEXT_FIELDS + OPTIONAL_TEXT_FIELDS:
        value = record.get(name)
        if value is None and name in REQUIRED_TEXT_FIELDS:
            raise PromptFormatError(f"{where}: field {name!r} is missing; every row needs a string {name!r}")
        if value is not None and not isinstance(value, str):
            raise PromptFormatError(
                f"{where}: field {name!r} must be a string, got {_json_type(value)} {value!r:.60}; "
                f'write it in quotes, e.g. "{name}": "{value!s:.40}"'
            )
    if record["id"] == "":
        raise PromptFormatError(f"{where}: field 'id' is empty; give every row a unique non-empty id")
    if record.get("meta") is not None and not isinstance(record["meta"], dict):
        raise PromptFormatError(
            f"{where}: field 'meta' must be an object (or absent), got {_json_type(record['meta'])}"
        )
    _check_instruction(record, where)
    _check_script(record.get("meta") or {}, where)


def _check_script(meta: dict[str, Any], where: str) -> None:
    """A scripted row's ``meta.follow_ups`` (non-empty strings) and ``meta.turn_references`` (strings, one per turn)."""
    for name in (FOLLOW_UPS, TURN_REFERENCES):
        value = meta.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            raise PromptFormatError(f"{where}: field 'meta.{name}' must be a list of strings, got {value!r:.60}")
    follow_ups, references = meta.get(FOLLOW_UPS), meta.get(TURN_REFERENCES)
    if follow_ups is not None and not all(item.strip() for item in follow_ups):
        raise PromptFormatError(f"{where}: field 'meta.{FOLLOW_UPS}' holds an empty user message; remove or fill it")
    if references is not None and len(references) != 1 + len(follow_ups or ()):
        raise PromptFormatError(
            f"{where}: field 'meta.{TURN_REFERENCES}' has {len(references)} answers for {1 + len(follow_ups or ())} "
            f"turns (the instruction and {len(follow_ups or ())} follow-ups); give one reference per turn"
        )


def _check_instruction(record: dict[str, Any], where: str) -> None:
    """The instruction (or the pair trajectory's first user turn) must be a non-empty string."""
    if record.get("instruction") is None and record.get("trajectory") is not None:
        name, value = "trajectory", record["trajectory"]
        if not isinstance(value, list):
            raise PromptFormatError(f"{where}: field 'trajectory' must be a list of {{from, value}} turns")
        value = _first_user_turn(value)
        if value is None:
            raise PromptFormatError(f"{where}: field 'trajectory' has no {{'from': 'user'}} turn; {INSTRUCTION_HELP}")
    else:
        name, value = "instruction", record.get("instruction")
    if value is None:
        raise PromptFormatError(f"{where}: field 'instruction' is missing; {INSTRUCTION_HELP}")
    if not isinstance(value, str):
        raise PromptFormatError(
            f"{where}: field {name!r} must hold a string, got {_json_type(value)}; {INSTRUCTION_HELP}"
        )
    if not value.strip():
        raise PromptFormatError(f"{where}: field {name!r} is empty; {INSTRUCTION_HELP}")


def _first_user_turn(trajectory: list[Any]) -> Any:
    """``value`` of the first ``{"from": "user"}`` turn, or None."""
    for turn in trajectory:
        if isinstance(turn, dict) and turn.get("from") == "user":
            return turn.get("value")
    return None


def _to_prompt_row(record: dict[str, Any]) -> PromptRow:
    """Convert a checked record; fields outside :data:`ROW_FIELDS` and ``meta`` entries go to ``meta``.

    UltraInteract rows (``_sft`` / ``_pair``: they carry ``parent_id``) have neither ``split`` nor
    ``reference``. They get ``split = "train"``, the only split UltraInteract publishes, so the default
    ``splits=["train"]`` filter keeps them; an ``_sft`` row of a Math task gets the last ``\\boxed{}``
    answer of its ``response`` (UltraInteract's SFT responses are its correct trajectories, which end
    in ``Answer: \\boxed{...}`` for ``Math_CoT``) as ``reference``, and ``None`` when it has none.
    """
    instruction = record.get("instruction")
    if instruction is None:
        instruction = _first_user_turn(record["trajectory"])
    extra = {name: value for name, value in record.items() if name not in ROW_FIELDS}
    meta = {**(record.get("meta") or {}), **extra}
    split, reference = record.get("split"), record.get("reference")
    if record.get("parent_id") is not None:
        split = split or HUB_SPLIT
        if reference is None and record["task"].startswith("Math") and isinstance(record.get("response"), str):
            reference = last_boxed(record["response"])
    return PromptRow(
        id=record["id"],
        task=record["task"],
        dataset=record["dataset"],
        instruction=instruction,
        reference=reference,
        split=split or "",
        meta={name: value for name, value in meta.items() if value is not None},
    )


def _rows_from_records(records: list[dict[str, Any]], locate: Callable[[int], str]) -> list[PromptRow]:
    """Check and convert every record; ids must be unique."""
    rows: list[PromptRow] = []
    first_seen: dict[str, int] = {}
    for index, record in enumerate(records):
        _check_record(record, locate(index))
        row = _to_prompt_row(record)
        if row.id in first_seen:
            raise PromptFormatError(
                f"{locate(index)}: field 'id' {row.id!r} repeats the id at {locate(first_seen[row.id])}; "
                "give every row a unique id"
            )
        first_seen[row.id] = index
        rows.append(row)
    return rows


# ---- filtering --------------------------------------------------------------------------------


def _filter_fields(
    rows: list[PromptRow], wanted: dict[str, Sequence[str] | None], report: LoadReport
) -> list[PromptRow]:
    """Keep rows whose field value is wanted; count drops as ``report.filtered_<field>``."""
    for name, values in wanted.items():
        if values is None or list(values) == [ALL]:
            continue
        allowed = set(values)
        present = {getattr(row, name) for row in rows}
        if allowed - present:
            logger.warning(
                "%s %s match no row left by earlier filters; present: %s",
                name,
                sorted(allowed - present),
                sorted(present),
            )
        kept = [row for row in rows if getattr(row, name) in allowed]
        setattr(report, f"filtered_{name}", len(rows) - len(kept))
        rows = kept
    return rows


def _dedupe(rows: list[PromptRow], report: LoadReport) -> list[PromptRow]:
    """Keep the first row of each question (:func:`~dialogsim.prompts.question_key`: the normalised instruction,
    and the scripted follow-ups of rows that have them)."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = question_key(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    report.duplicate = len(rows) - len(kept)
    return kept


def prompt_token_counts(instructions: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Length in tokens of each instruction as one chat-templated user turn plus the generation prompt.

    Tokenised in batches of :data:`TOKENIZE_BATCH` through ``tokenizer.apply_chat_template``, so a
    template's default system prompt is counted. Raises what ``apply_chat_template`` raises, e.g.
    ValueError for a tokenizer without a chat template.
    """
    return chat_token_counts([[{"role": "user", "content": text}] for text in instructions], tokenizer)


def chat_token_counts(conversations: Sequence[Sequence[Message]], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Length in tokens of each chat-templated conversation plus the generation prompt.

    Tokenised in batches of :data:`TOKENIZE_BATCH` through ``tokenizer.apply_chat_template``. Raises
    what ``apply_chat_template`` raises.
    """
    counts: list[int] = []
    for start in range(0, len(conversations), TOKENIZE_BATCH):
        encoded = tokenizer.apply_chat_template(
            [list(c) for c in conversations[start : start + TOKENIZE_BATCH]],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
        counts.extend(len(ids) for ids in encoded["input_ids"])
    return counts


Item = TypeVar("Item")


def _within_budget(items: list[Item], counts: list[int], budget: int, report: LoadReport) -> list[Item]:
    """Keep the items whose token count (``counts``, aligned) is at most ``budget``; count the others."""
    kept = [item for item, count in zip(items, counts, strict=True) if count <= budget]
    report.over_token_budget = len(items) - len(kept)
    return kept


def _shuffle_and_limit(items: list[Item], seed: int | None, limit: int | None, report: LoadReport) -> list[Item]:
    """Shuffle with ``seed`` (``None``: keep the order), keep the first ``limit``; record and log the report."""
    if seed is not None:
        random.Random(seed).shuffle(items)
    if limit is not None:
        report.over_limit, items = max(0, len(items) - limit), items[:limit]
    report.rows_kept = len(items)
    logger.info("%s", report)
    return items


# ---- offline dialogues ------------------------------------------------------------------------


def _check_object(record: object, where: str) -> None:
    """An offline-dialogue row must at least be a JSON object (its dialogue is checked later, leniently)."""
    if not isinstance(record, dict):
        raise PromptFormatError(
            f"{where}: expected a JSON object such as {EXAMPLE_DIALOGUE}, got a JSON {_json_type(record)}"
        )


def _raw_dialogue(record: dict[str, Any]) -> Any:
    """The row's ``messages``, else its ``trajectory`` as ``{role, content}`` dicts (``None`` if neither)."""
    if record.get("messages") is not None:
        return record["messages"]
    trajectory = record.get("trajectory")
    if not isinstance(trajectory, list):
        return trajectory
    return [
        {"role": turn.get("from"), "content": turn.get("value")} if isinstance(turn, dict) else turn
        for turn in trajectory
    ]


def _dialogue_problem(raw: Any) -> str | None:
    """The LoadReport reason a raw dialogue is unusable for, or ``None`` when it is a valid dialogue."""
    if raw is None or (isinstance(raw, list) and not raw):
        return "empty"
    well_typed = isinstance(raw, list) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in raw
    )
    if not well_typed:
        return "malformed"
    if any(not m["content"].strip() for m in raw) or count_turns(raw) == 0:
        return "empty"
    try:
        validate_messages(raw)
    except MessageFormatError:
        return "roles_not_alternating"
    return None


def _cut(messages: list[Message], max_turns: int | None) -> tuple[Message, ...]:
    """The messages up to and including the last (or the ``max_turns``-th) user message, as ``{role, content}``."""
    turns = count_turns(messages) if max_turns is None else min(max_turns, count_turns(messages))
    cut: list[Message] = []
    for message in messages:
        if message["role"] == "user":
            if turns == 0:
                break
            turns -= 1
        cut.append({"role": message["role"], "content": message["content"]})
    while cut[-1]["role"] != "user":
        cut.pop()
    return tuple(cut)


def _dialogues_from_records(
    records: list[dict[str, Any]], prompts: Sequence[PromptRow], max_turns: int | None, report: LoadReport
) -> list[OfflineDialogue]:
    """Check, cut, deduplicate and map every row; count the drops in ``report``."""
    by_key: dict[str, str] = {}
    for row in prompts:
        by_key.setdefault(instruction_key(row.instruction), row.id)
    seen: set[tuple[tuple[str, str], ...]] = set()
    ids: set[str] = set()
    dialogues = []
    for index, record in enumerate(records):
        raw = _raw_dialogue(record)
        problem = _dialogue_problem(raw)
        if problem is not None:
            setattr(report, problem, getattr(report, problem) + 1)
            continue
        messages = _cut(raw, max_turns)
        key = tuple((m["role"], m["content"]) for m in messages)
        if key in seen:
            report.duplicate += 1
            continue
        seen.add(key)
        prompt_id = by_key.get(instruction_key(next(m["content"] for m in messages if m["role"] == "user")))
        if prompt_id is None:
            report.no_prompt_row += 1
            continue
        dialogue_id = _dialogue_id(record, index, ids)
        ids.add(dialogue_id)
        dialogues.append(OfflineDialogue(dialogue_id, prompt_id, messages))
    return dialogues


def _dialogue_id(record: dict[str, Any], index: int, taken: set[str]) -> str:
    """The row's string ``id`` (else ``row-<index>``), with ``#<index>`` appended if already taken."""
    named = record.get("id")
    dialogue_id = named if isinstance(named, str) and named else f"row-{index}"
    return f"{dialogue_id}#{index}" if dialogue_id in taken else dialogue_id


PROMPT_ROWS = _RowSchema(_check_record, EXAMPLE_ROW)
DIALOGUE_ROWS = _RowSchema(_check_object, EXAMPLE_DIALOGUE)
