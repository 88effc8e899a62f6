"""Manifests of a job's prompts: which rows it trained and evaluated on, by id and SHA-256, without the text.

``python -m refuel.manifests`` (defaults: the main job's ``configs/cpu_main.yaml`` and ``configs/cpu_eval.yaml``)
selects the prompts exactly as ``refuel-train`` and ``refuel-evaluate`` do (:func:`dialogsim.data.load_prompt_rows`
with the run's filters, token budget and hold-out, :func:`refuel.evaluation.evaluate.evaluation_prompts`) and writes to
``data/manifests/``:

- ``<name>_train.jsonl``: the rows ``refuel-train`` draws its reset points from;
- ``<name>_heldout.jsonl``: the held-out rows, never trained on; ``evaluated`` marks the ones
  ``refuel-evaluate`` ran (the first ``n_prompts``);
- ``<name>.json``: the prompt source and its SHA-256, the filters, the load report (rows dropped per
  reason) and the counts.

Each manifest row holds ``id``, ``task``, ``dataset``, ``split``, ``source_id`` and the SHA-256 of the UTF-8
``instruction`` and ``reference`` (``null`` when the row has none), so a result can be traced to its rows
and a local copy of the prompts checked against them; the prompt text itself is never written. ``--check``
rebuilds the manifests in memory and exits 1 when the committed ones differ (e.g. the prompt file changed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dialogsim.backends.transformers_backend import load_tokenizer
from dialogsim.console import EPILOG, UsageError, console_command
from dialogsim.data import PromptConfig, default_prompt_source, load_prompt_rows, select_partition
from dialogsim.prompts import PromptRow
from dialogsim.settings import field_names
from refuel.cli import parse_config
from refuel.config import RefuelConfig
from refuel.evaluation.evaluate import EvaluateConfig, evaluation_prompts
from refuel.provenance import file_sha256

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "configs" / "cpu_main.yaml"
EVAL_CONFIG = REPO / "configs" / "cpu_eval.yaml"
MANIFEST_DIR = REPO / "data" / "manifests"


def text_sha256(text: str | None) -> str | None:
    """Hex SHA-256 of ``text`` encoded as UTF-8; ``None`` for ``None``."""
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def manifest_row(row: PromptRow) -> dict[str, Any]:
    """One prompt row without its text: ids, provenance fields and the hashes of instruction and reference."""
    return {
        "id": row.id,
        "task": row.task,
        "dataset": row.dataset,
        "split": row.split,
        "source_id": row.meta.get("source_id"),
        "instruction_sha256": text_sha256(row.instruction),
        "reference_sha256": text_sha256(row.reference),
    }


def build_manifests(train_file: Path, eval_file: Path, name: str) -> dict[str, str]:
    """The manifest files of a job, as file name → content (JSON Lines and one JSON summary).

    Args:
        train_file / eval_file: the job's ``refuel-train`` and ``refuel-evaluate`` ``--config`` files.
        name: file name prefix.

    Raises:
        UsageError: the two configs select prompts differently (source, filters, hold-out or token budget), so
            the evaluation would not run on the training run's held-out rows; what the prompt loader raises.
    """
    train_config = parse_config(RefuelConfig, ["--config", str(train_file)], description="")
    eval_config = parse_config(EvaluateConfig, ["--config", str(eval_file)], description="")
    selection = field_names(PromptConfig)
    differ = [f for f in selection if getattr(train_config, f) != getattr(eval_config, f)]
    if differ or train_config.policy_model != eval_config.baseline:
        raise UsageError(
            f"the training and evaluation configs select prompts differently ({differ or ['policy_model/baseline']}); "
            "give them the same prompts, filters, holdout, max_prompt_tokens and π_0"
        )
    rows, report = load_prompt_rows(train_config, load_tokenizer(train_config.policy_model))
    train, heldout = (select_partition(rows, train_config.holdout, part) for part in ("train", "heldout"))
    evaluated = {row.id for row in evaluation_prompts(eval_config)[0]}
    source = train_config.prompts if train_config.prompts is not None else default_prompt_source()
    source_path = Path(source)
    shown_source = _shown(source_path) if source_path.is_file() else str(source)
    summary = {
        "source": shown_source,
        "source_sha256": file_sha256(source_path) if source_path.is_file() else None,
        "train_config": _shown(train_file),
        "eval_config": _shown(eval_file),
        "filters": {f: getattr(train_config, f) for f in selection if f != "prompts"},
        "token_budget_tokenizer": train_config.policy_model,
        "load_report": asdict(report) | {"source": shown_source},
        "train_rows": len(train),
        "heldout_rows": len(heldout),
        "evaluated_rows": len(evaluated),
        "command": "python -m refuel.manifests",
    }
    return {
        f"{name}_train.jsonl": _jsonl(manifest_row(row) for row in train),
        f"{name}_heldout.jsonl": _jsonl(manifest_row(row) | {"evaluated": row.id in evaluated} for row in heldout),
        f"{name}.json": json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
    }


def _jsonl(rows: Any) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it or beside it (``../shared/...``), else absolute."""
    resolved = path.resolve()
    for base, prefix in ((REPO, ""), (REPO.parent, "../")):
        if resolved.is_relative_to(base):
            return prefix + str(resolved.relative_to(base))
    return str(resolved)


@console_command
def main(argv: list[str]) -> int:
    """Entry point of ``python -m refuel.manifests``; returns the exit status (1: ``--check`` found a difference)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG
    )
    parser.add_argument("--train_config", type=Path, default=TRAIN_CONFIG, help="refuel-train YAML of the job")
    parser.add_argument("--eval_config", type=Path, default=EVAL_CONFIG, help="refuel-evaluate YAML of the job")
    parser.add_argument("--name", default="main", help="file name prefix of the manifests")
    parser.add_argument("--out", type=Path, default=MANIFEST_DIR, help="folder of the manifests")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args(argv)
    files = build_manifests(args.train_config, args.eval_config, args.name)
    if args.check:
        stale = [f for f, text in files.items() if not (args.out / f).is_file() or (args.out / f).read_text() != text]
        print(f"manifests in {args.out}: " + (f"differ from the prompts: {stale}" if stale else "up to date"))
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for file_name, text in files.items():
        (args.out / file_name).write_text(text)
        print(f"  {args.out / file_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
