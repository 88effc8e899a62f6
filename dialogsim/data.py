"""Load UltraInteract-format prompts as :class:`~dialogsim.prompts.PromptRow` lists.

Data format: openbmb/UltraInteract (https://huggingface.co/datasets/openbmb/UltraInteract_sft,
https://github.com/OpenBMB/Eurus). Three row schemas are read, one row per prompt:

- prompt format (the shared ``prompts.jsonl``): ``id, task, dataset, split, source_id, instruction,
  reference, meta``;
- ``UltraInteract_sft``: ``task, dataset, instruction, response, id, parent_id``;
- ``UltraInteract_pair``: ``task, dataset, trajectory, chosen, rejected, id, parent_id``; the
  instruction is the first ``{"from": "user"}`` turn of ``trajectory``.

Fields other than ``id, task, dataset, instruction, reference, split, meta`` go into ``PromptRow.meta``
(null values are dropped there, since Arrow fills keys missing from a row with null).
Sources are local ``.jsonl`` / ``.json`` / ``.parquet`` files, local dataset folders and hub dataset
ids, all read through :func:`datasets.load_dataset`, so caching is the ``datasets`` cache.

>>> rows, report = load_prompts(default_prompt_file(), tasks=["Math_CoT"], datasets=["gsm8k"])
>>> train, evaluation = split_train_eval(rows, eval_fraction=0.1, seed=0)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import load_dataset

from dialogsim.prompts import PromptRow

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROMPTS_ENV_VAR = "DIALOGSIM_PROMPTS"
SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ultrainteract" / "prompts.jsonl"
HUB_SPLIT = "train"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REQUIRED_TEXT_FIELDS = ("id", "task", "dataset")
OPTIONAL_TEXT_FIELDS = ("reference", "split")
ROW_FIELDS = frozenset({"id", "task", "dataset", "instruction", "reference", "split", "meta"})
TOKENIZE_BATCH = 256
EXAMPLE_ROW = '{"id": "q1", "task": "Math_CoT", "dataset": "gsm8k", "instruction": "What is 2+2?", "reference": "4"}'
INSTRUCTION_HELP = (
    "every row needs the user turn as a non-empty string 'instruction' (prompt format, UltraInteract_sft) "
    "or a 'trajectory' list whose first {'from': 'user'} turn holds it (UltraInteract_pair)"
)
_JSON_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')


class PromptFormatError(ValueError):
    """A prompt source breaks the UltraInteract row format; the message names the file, line or row, and field."""


@dataclass
class LoadReport:
    """What :func:`load_prompts` read, dropped (per reason, first reason wins) and kept.

    ``rows_read == rows_kept + filtered_task + filtered_dataset + filtered_split + duplicate
    + over_token_budget + over_limit``.
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

    def __str__(self) -> str:
        return (
            f"{self.source}: kept {self.rows_kept} of {self.rows_read} prompts (dropped: task {self.filtered_task}, "
            f"dataset {self.filtered_dataset}, split {self.filtered_split}, duplicate {self.duplicate}, "
            f"over token budget {self.over_token_budget}, over limit {self.over_limit})"
        )


def default_prompt_file() -> Path:
    """The prompt file to use when none is given.

    Returns:
        ``$DIALOGSIM_PROMPTS`` if set, else the shared ``prompts.jsonl`` at
        ``<repo>/../shared/data/ultrainteract/`` (found relative to this package).

    Raises:
        FileNotFoundError: ``$DIALOGSIM_PROMPTS`` names no file, or it is unset and the shared file is absent.
    """
    configured = os.environ.get(PROMPTS_ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${PROMPTS_ENV_VAR} is set to {path}, which is not a file; fix or unset it")
        return path
    if SHARED_PROMPTS.is_file():
        return SHARED_PROMPTS
    raise FileNotFoundError(
        f"no prompt file: ${PROMPTS_ENV_VAR} is unset and {SHARED_PROMPTS} does not exist; pass a "
        ".jsonl/.json/.parquet file in UltraInteract format or a hub id (openbmb/UltraInteract_sft)"
    )


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
    rows whose instruction repeats an earlier one (after NFKC, case folding and whitespace collapsing);
    drop rows whose chat-templated prompt (one user message plus the generation prompt, including any
    default system prompt of the template) is longer than ``max_prompt_tokens`` tokens; shuffle with
    ``seed``; keep the first ``limit`` rows. The report is logged at INFO.

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a local dataset folder, or a hub dataset
            id such as ``openbmb/UltraInteract_pair`` (split ``train``) in one of the schemas above.
        tasks: keep only these tasks, e.g. ``["Math_CoT"]``; ``None`` keeps all.
        datasets: keep only these source datasets, e.g. ``["gsm8k"]``; ``None`` keeps all.
        splits: keep only these source splits, e.g. ``["train"]``; ``None`` keeps all.
        tokenizer: tokenizer with a chat template, used with ``max_prompt_tokens``.
        max_prompt_tokens: token budget of the templated prompt (tokens); needs ``tokenizer``.
        limit: keep at most this many rows (after everything else).
        seed: seed of the shuffle.
        shuffle: shuffle the kept rows (deterministic given ``seed``).
        cache_dir: ``datasets`` cache folder; ``None`` uses the ``datasets`` default.

    Returns:
        The kept rows and a :class:`LoadReport`.

    Raises:
        FileNotFoundError: ``source`` is neither a file, a folder nor a hub id.
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
        rows = _drop_over_budget(rows, tokenizer, max_prompt_tokens, report)
    if shuffle:
        random.Random(seed).shuffle(rows)
    if limit is not None:
        report.over_limit = max(0, len(rows) - limit)
        rows = rows[:limit]
    report.rows_kept = len(rows)
    logger.info("%s", report)
    if not rows:
        raise ValueError(f"no prompts left: {report}; loosen tasks/datasets/splits or raise max_prompt_tokens")
    return rows, report


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
    for name, value in (("limit", limit), ("max_prompt_tokens", max_prompt_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")


# ---- reading ----------------------------------------------------------------------------------


def _read_records(source: str | Path, cache_dir: str | None) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    """Load raw rows with ``datasets`` and a function naming where row ``i`` came from."""
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path, cache_dir)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) is not None
    if path.is_dir() or (looks_like_hub_id and path.suffix.lower() not in FILE_BUILDERS):
        return _read_dataset(str(source), cache_dir)
    raise FileNotFoundError(
        f"prompt source {str(source)!r} is neither a file, a folder nor a hub dataset id; pass a "
        f".jsonl/.json/.parquet file (e.g. {SHARED_PROMPTS}) or a hub id (openbmb/UltraInteract_sft)"
    )


def _read_file(path: Path, cache_dir: str | None) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    """Load a local file; JSON files are pre-validated first so that errors carry line numbers."""
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise PromptFormatError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
    locations = _prevalidate_json(path) if builder == "json" else None
    records = load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir).to_list()
    if not records:
        raise PromptFormatError(f"{path}: the file holds no rows; expected rows such as {EXAMPLE_ROW}")
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


def _prevalidate_json(path: Path) -> list[str]:
    """Check every row of a JSON Lines file (or JSON array); return each row's location, in order."""
    data = path.read_bytes()
    if not data.strip():
        raise PromptFormatError(f"{path}: the file is empty; expected one JSON object per line, e.g. {EXAMPLE_ROW}")
    if data.lstrip()[:1] == b"[":
        return _prevalidate_array(path, data)
    locations = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            where = f"{path}, line {number}"
            _check_record(_parse_json(line, where), where)
            locations.append(where)
    return locations


def _prevalidate_array(path: Path, data: bytes) -> list[str]:
    """Check a ``.json`` file holding one JSON array of rows; locations are 0-based element indices."""
    records = _parse_json(data, str(path))
    if not isinstance(records, list) or not records:
        raise PromptFormatError(f"{path}: expected a non-empty JSON array of rows such as {EXAMPLE_ROW}")
    locations = [f"{path}, element {index} (0-based)" for index in range(len(records))]
    for record, where in zip(records, locations, strict=True):
        _check_record(record, where)
    return locations


def _parse_json(raw: bytes, where: str) -> Any:
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
                f"each row must be one complete JSON object on one line, e.g. {EXAMPLE_ROW}",
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
    """Convert a checked record; fields outside :data:`ROW_FIELDS` and ``meta`` entries go to ``meta``."""
    instruction = record.get("instruction")
    if instruction is None:
        instruction = _first_user_turn(record["trajectory"])
    extra = {name: value for name, value in record.items() if name not in ROW_FIELDS}
    meta = {**(record.get("meta") or {}), **extra}
    return PromptRow(
        id=record["id"],
        task=record["task"],
        dataset=record["dataset"],
        instruction=instruction,
        reference=record.get("reference"),
        split=record.get("split") or "",
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
        if values is None:
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


def _normalise(text: str) -> str:
    """Instruction key for deduplication: NFKC, case-folded, whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _dedupe(rows: list[PromptRow], report: LoadReport) -> list[PromptRow]:
    """Keep the first row of each normalised instruction."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = _normalise(row.instruction)
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
    counts: list[int] = []
    for start in range(0, len(instructions), TOKENIZE_BATCH):
        conversations = [[{"role": "user", "content": text}] for text in instructions[start : start + TOKENIZE_BATCH]]
        encoded = tokenizer.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        counts.extend(len(ids) for ids in encoded["input_ids"])
    return counts


def _drop_over_budget(
    rows: list[PromptRow], tokenizer: PreTrainedTokenizerBase, max_prompt_tokens: int, report: LoadReport
) -> list[PromptRow]:
    """Drop rows whose templated prompt exceeds ``max_prompt_tokens`` tokens."""
    counts = prompt_token_counts([row.instruction for row in rows], tokenizer)
    kept = [row for row, count in zip(rows, counts, strict=True) if count <= max_prompt_tokens]
    report.over_token_budget = len(rows) - len(kept)
    return kept
