"""The committed manifests of the main job's prompts (data/manifests) match the shared prompts, without their text."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from refuel.manifests import MANIFEST_DIR, main

ROW_KEYS = {"id", "task", "dataset", "split", "source_id", "instruction_sha256", "reference_sha256"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_committed_manifests_are_what_the_main_job_selects(smollm2_path: str, shared_prompts: Path) -> None:
    """``python -m refuel.manifests --check`` rebuilds them from configs/cpu_main.yaml + cpu_eval.yaml."""
    assert main(["--check"]) == 0


def test_manifests_hold_ids_and_hashes_never_text(shared_prompts: Path) -> None:
    shared = {row["id"]: row for row in read_jsonl(shared_prompts)}
    train, heldout = read_jsonl(MANIFEST_DIR / "main_train.jsonl"), read_jsonl(MANIFEST_DIR / "main_heldout.jsonl")
    summary = json.loads((MANIFEST_DIR / "main.json").read_text())
    assert (len(train), len(heldout), sum(row["evaluated"] for row in heldout)) == (
        summary["train_rows"],
        summary["heldout_rows"],
        summary["evaluated_rows"],
    )
    assert not {row["id"] for row in train} & {row["id"] for row in heldout}  # never trained on
    for row in [*train, *heldout]:
        assert set(row) - {"evaluated"} == ROW_KEYS
        source = shared[row["id"]]
        assert row["instruction_sha256"] == hashlib.sha256(source["instruction"].encode()).hexdigest()
        assert row["reference_sha256"] == hashlib.sha256(source["reference"].encode()).hexdigest()
    text = (MANIFEST_DIR / "main_train.jsonl").read_text()
    assert shared[train[0]["id"]]["instruction"][-60:] not in text


def test_check_finds_a_changed_manifest(smollm2_path: str, shared_prompts: Path, tmp_path: Path) -> None:
    stale = tmp_path / "manifests"
    shutil.copytree(MANIFEST_DIR, stale)
    heldout = stale / "main_heldout.jsonl"
    heldout.write_text(heldout.read_text().replace('"evaluated": true', '"evaluated": false', 1))
    assert main(["--check", "--out", str(stale)]) == 1
    assert main(["--out", str(stale)]) == 0 and heldout.read_text() == (MANIFEST_DIR / heldout.name).read_text()


@pytest.mark.parametrize("flag", ["--holdout", "--tasks"])
def test_configs_that_select_different_prompts_are_rejected(
    tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_config = tmp_path / "eval.yaml"
    value = "8" if flag == "--holdout" else "[Coding]"
    eval_config.write_text(f"{flag.lstrip('-')}: {value}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--eval_config", str(eval_config), "--check"])
    assert exit_info.value.code == 2  # a refused combination (dialogsim.console)
    assert flag.lstrip("-") in capsys.readouterr().err
