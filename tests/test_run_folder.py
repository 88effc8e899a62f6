"""The run folder of ``refuel-train``: stage settings recorded and checked, foreign folders refused, resumes.

One real run of the tiny model (a subprocess, as a user runs it) is copied into each test's folder; every
refusal is checked in-process, where it must come before anything loads or is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from dialogsim.models import check_model_name
from refuel.run_folder import RUN_MARKER
from refuel.training.iterations import main


def _flags(output_dir: Path, tiny_model_path: str, shared_prompts: Path) -> list[str]:
    return [
        "--output_dir", str(output_dir),
        "--policy_model", tiny_model_path,
        "--user_model", tiny_model_path,
        "--prompts", str(shared_prompts),
        "--holdout", "0",
        "--pairs_per_iteration", "4",
        "--generation_batch_size", "4",
        "--max_horizon", "2",
        "--max_new_tokens", "8",
        "--max_prompt_tokens", "100",
        "--per_device_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--validation_fraction", "0.25",
    ]  # fmt: skip


def _train(flags: list[str]) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "refuel.training.iterations", *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def finished_run(tiny_model_path: str, shared_prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-iteration run of the tiny model (4 pairs, 2-token micro-batches)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    result = _train(_flags(folder, tiny_model_path, shared_prompts))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished run that a test may change."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _refused(flags: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``refuel-train`` in-process; it must exit with an error message, which is returned."""
    with pytest.raises(SystemExit) as raised:
        main(flags)
    assert raised.value.code not in (0, None)
    return str(raised.value.code) + capsys.readouterr().err


@pytest.mark.slow
def test_a_finished_run_refuses_other_training_settings_and_keeps_config_json(
    run_copy: Path, tiny_model_path: str, shared_prompts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--eta 100 on a finished run: refused naming eta and the fix; config.json and the policy are untouched."""
    config = (run_copy / "config.json").read_bytes()
    message = _refused([*_flags(run_copy, tiny_model_path, shared_prompts), "--eta", "100"], capsys)
    assert "iteration_0 training: eta 10.0 → 100.0" in message
    assert "--restart_stage training" in message and "new --output_dir" in message
    assert (run_copy / "config.json").read_bytes() == config


@pytest.mark.slow
def test_a_partial_run_refuses_other_collection_settings(
    run_copy: Path, tiny_model_path: str, shared_prompts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed once pairs.jsonl existed (policy and metrics gone), rerun with other sampling and η: refused."""
    shutil.rmtree(run_copy / "iteration_0" / "policy")
    (run_copy / "iteration_0" / "metrics.json").unlink()
    changed = ["--max_new_tokens", "12", "--temperature", "1.2", "--eta", "50"]
    message = _refused([*_flags(run_copy, tiny_model_path, shared_prompts), *changed], capsys)
    assert "iteration_0 collection: max_new_tokens 8 → 12, temperature 0.8 → 1.2" in message
    assert "eta 10.0 → 50.0" in message and "--restart_stage collection" in message
    # a restart of training alone would train on pairs sampled with the old settings: refused too
    message = _refused(
        [*_flags(run_copy, tiny_model_path, shared_prompts), *changed, "--restart_stage", "training"], capsys
    )
    assert "--restart_stage collection" in message


@pytest.mark.slow
def test_a_run_written_before_run_json_is_checked_against_its_config_json(
    run_copy: Path, tiny_model_path: str, shared_prompts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs of earlier versions (no run.json) are adopted: config.json stands for their stages."""
    (run_copy / RUN_MARKER).unlink()
    message = _refused([*_flags(run_copy, tiny_model_path, shared_prompts), "--learning_rate", "1e-3"], capsys)
    assert "learning_rate 1e-06 → 0.001" in message


@pytest.mark.slow
def test_settings_no_stage_depends_on_are_allowed(
    run_copy: Path, tiny_model_path: str, shared_prompts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoint frequency and engine memory may change: the finished iteration is reused."""
    flags = [*_flags(run_copy, tiny_model_path, shared_prompts), "--checkpoint_every", "3", "--vllm_kv_cache_gib", "2"]
    main(flags)
    assert "final policy" in capsys.readouterr().out
    assert json.loads((run_copy / "config.json").read_text())["checkpoint_every"] == 3


@pytest.mark.slow
def test_restart_stage_training_retrains_on_the_same_pairs(
    run_copy: Path, tiny_model_path: str, shared_prompts: Path
) -> None:
    """--eta 100 --restart_stage training: the pairs are kept, training runs again and records the new η."""
    pairs = (run_copy / "iteration_0" / "collection.json").read_bytes()
    result = _train([*_flags(run_copy, tiny_model_path, shared_prompts), "--eta", "100", "--restart_stage", "training"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_copy / "iteration_0" / "collection.json").read_bytes() == pairs
    stages = json.loads((run_copy / RUN_MARKER).read_text())["stages"]["iteration_0"]
    assert stages["training"]["eta"] == 100.0 and stages["collection"]["temperature"] == 0.8
    metrics = json.loads((run_copy / "iteration_0" / "metrics.json").read_text())
    assert metrics["validation_before"]["loss"] > 0 and (run_copy / "iteration_0" / "policy" / "config.json").exists()


@pytest.mark.slow
def test_a_run_killed_before_metrics_json_writes_it_on_resume(
    run_copy: Path, tiny_model_path: str, shared_prompts: Path
) -> None:
    """policy/ on disk but no metrics.json (killed in between): the same command finishes the iteration."""
    (run_copy / "iteration_0" / "metrics.json").unlink()
    result = _train(_flags(run_copy, tiny_model_path, shared_prompts))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_copy / "iteration_0" / "metrics.json").read_text())
    assert metrics["pairs"] >= 1 and len(metrics["steps"]) >= 1


def test_a_model_folder_as_output_dir_is_refused_before_anything_is_written(
    tiny_model_path: str, shared_prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--output_dir pointing at a model: refused with the reason; the model's config.json is unchanged."""
    model = Path(shutil.copytree(tiny_model_path, tmp_path / "model"))
    before = {path.name: path.read_bytes() for path in model.iterdir()}
    message = _refused(_flags(model, tiny_model_path, shared_prompts), capsys)
    assert "not a refuel-train run" in message and "config.json" in message
    assert {path.name: path.read_bytes() for path in model.iterdir()} == before


def test_a_model_name_typo_names_the_known_models(
    tmp_path: Path,
    tiny_model_path: str,
    shared_prompts: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """smollm2-135m (no -instruct): refused with the known names, not a hub connection error."""
    message = _refused(
        [*_flags(tmp_path / "run", tiny_model_path, shared_prompts), "--policy_model", "smollm2-135m"], capsys
    )
    assert re.search(r"policy_model='smollm2-135m'.*did you mean 'smollm2-135m-instruct'", message), message
    with pytest.raises(ValueError, match="no such folder"):
        check_model_name("candidates", str(tmp_path / "no" / "such" / "policy"))
    assert check_model_name("policy_model", tiny_model_path) == "folder"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, a hub id is checked for form only
    assert check_model_name("policy_model", "HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
