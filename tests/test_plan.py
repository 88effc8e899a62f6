"""The dry run ``python -m refuel.plan``: the GPU recipe validates on CPU, offline, and bad launches fail clearly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from dialogsim import arithmetic
from refuel.cli import parse_config
from refuel.config import RefuelConfig
from refuel.plan import Plan, main, make_plan

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "gpu_setting_one.yaml"
ACCELERATE = REPO / "configs" / "accelerate"


def _plan(*flags: str, accelerate: str | None = "fsdp.yaml", processes: int | None = None) -> Plan:
    config = parse_config(RefuelConfig, ["--config", str(RECIPE), *flags], description="test")
    return make_plan(config, ACCELERATE / accelerate if accelerate else None, processes, RECIPE)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test on any network connection or model load."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the dry run used the network or loaded a model: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)


def test_gpu_recipe_dry_run_command_exits_0() -> None:
    """The documented command prints the paper's Setting One plan and exits 0 (CI has no GPU, no hub access)."""
    command = [
        sys.executable,
        "-m",
        "refuel.plan",
        "--config",
        "configs/gpu_setting_one.yaml",
        "--accelerate_config",
        "configs/accelerate/fsdp.yaml",
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    for expected in (
        "accelerate launch --config_file configs/accelerate/fsdp.yaml -m refuel.training.iterations --config "
        "configs/gpu_setting_one.yaml",
        "8 (FSDP2, accelerate mixed precision bf16)",
        "meta-llama/Meta-Llama-3-8B-Instruct [hub id, not in the local cache]",  # HF_HUB_OFFLINE=1: a warning
        "warning: reward='RLHFlow/ArmoRM-Llama3-8B-v0.1': the hub is off",
        "meta-llama/Llama-3.1-70B-Instruct",
        "RLHFlow/ArmoRM-Llama3-8B-v0.1",
        "iterations     2: π_0 → π_1 → π_2",
        "60000 reset points → ≤ 59500 training + 500 validation pairs",
        "H ~ U{1..5}",
        "temperature 0.8",
        "≤ 1024 new tokens",
        "2 pairs/device × 8 accumulation × 8 processes = 128 pairs per optimizer step",
        "≤ 465 per iteration (1 epoch(s), warm-up 46, cosine to 0); ≤ 930 in all",
        "AdamW lr 3e-07, β (0.9, 0.95), weight decay 1e-06",
        "objective      REFUEL regression, η = 1000",
        "bf16 mixed precision, gradient checkpointing, full fine-tuning",
        "OK: the configuration is valid",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"


@pytest.mark.parametrize("engine", ["ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"])
def test_every_shipped_accelerate_config_validates_with_the_recipe(engine: str, offline: None) -> None:
    """Each engine file loads with accelerate's own loader and agrees with the recipe; nothing is fetched."""
    plan = _plan(accelerate=engine)
    assert plan.ok, plan.render()
    assert any("= 128 pairs per optimizer step" in line for line in plan.lines)
    if engine.startswith("deepspeed"):
        assert any("DeepSpeed saves π_{t+1} from bf16 weights" in warning for warning in plan.warnings)


def test_lora_is_valid_on_ddp_only(offline: None) -> None:
    """LoRA adapters are merged into whole weights: fine with DDP, an error with a sharded engine."""
    ddp = _plan("--lora_r", "16", accelerate="ddp.yaml")
    assert ddp.ok, ddp.render()
    assert any("LoRA r=16 α=32 on all-linear, merged on save" in line for line in ddp.lines)
    sharded = _plan("--lora_r", "16", accelerate="fsdp.yaml")
    assert any("lora_r=16 with FSDP2" in error and "ddp.yaml" in error for error in sharded.errors), sharded.errors


@pytest.mark.parametrize(
    ("flags", "processes", "accelerate", "message"),
    [
        ((), 4, "fsdp.yaml", "2 pairs per device × 8 accumulation × 4 processes = 64 pairs per step"),
        (("--mixed_precision", "no"), None, "fsdp.yaml", "the accelerate config's mixed_precision is 'bf16'"),
        (("--policy_model", "meta llama/Llama-3-8B"), None, "fsdp.yaml", "policy_model='meta llama/Llama-3-8B'"),
        (("--reward", "./no/such/rm"), None, "fsdp.yaml", "reward='./no/such/rm': no such folder"),
        (("--max_grad_norm", "0.5"), None, "deepspeed_zero3.yaml", "gradient_clipping=1.0 differs from max_grad_norm"),
    ],
)
def test_bad_combinations_fail_with_the_field_and_the_fix(
    flags: tuple[str, ...], processes: int | None, accelerate: str, message: str, offline: None
) -> None:
    plan = _plan(*flags, accelerate=accelerate, processes=processes)
    assert not plan.ok
    assert any(message in error for error in plan.errors), plan.errors
    assert "FAILED" in plan.render()


def test_vllm_tensor_parallelism_must_fit_the_gpus(offline: None) -> None:
    plan = _plan("--user_backend", "vllm", "--vllm_tensor_parallel_size", "16")
    assert any("vllm_tensor_parallel_size=16 for the user engine exceeds the 8 GPUs" in e for e in plan.errors)
    assert _plan("--user_backend", "vllm", "--vllm_tensor_parallel_size", "4").ok


def test_unknown_keys_in_an_accelerate_config_fail(tmp_path: Path, offline: None) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ACCELERATE / "deepspeed_zero3.yaml").read_text().replace("zero_stage: 3", "zero_stag: 3"))
    config = parse_config(RefuelConfig, ["--config", str(RECIPE)], description="test")
    plan = make_plan(config, bad, None, RECIPE)
    assert any("'zero_stag' is not an accelerate launch setting" in error for error in plan.errors), plan.errors
    missing = make_plan(config, tmp_path / "missing.yaml", None, RECIPE)
    assert any("missing.yaml" in error for error in missing.errors)


def test_cpu_main_config_plans_a_single_process(
    offline: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CPU main job needs no accelerate config; main() exits 0 and 2 as documented.

    The run folder is a fresh one: the config's own (runs/cpu-main) may hold a real run of other settings."""
    assert main(["--config", str(REPO / "configs" / "cpu_main.yaml"), "--output_dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "refuel-train --config" in out and "1 (single process" in out and "[embedded model (PyPI package)]" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(RECIPE), "--eta", "-1"])
    assert exit_info.value.code == 2
    assert "error: invalid RefuelConfig values: eta=-1.0" in capsys.readouterr().err


def test_arithmetic_main_config_plans(offline: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default main job's config (configs/arithmetic/main.yaml) validates on a generated file: H = 1, replayed
    user (no user model), reward turn_answer, 128 pairs."""
    prompts = tmp_path / "prompts.jsonl"
    arithmetic.main(["--output", str(prompts), "--train_dialogues", "40", "--heldout_dialogues", "10"])
    config = str(REPO / "configs" / "arithmetic" / "main.yaml")
    assert main(["--config", config, "--prompts", str(prompts), "--output_dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "template 'replay'" in out and "turn_answer" in out and "128 reset points" in out
    assert "H ~ U{1..1}" in out


@pytest.mark.parametrize(
    ("flags", "yaml_line", "message"),
    [
        (("--max_horizon", "9"), None, "max_horizon=9 (valid: an integer ≥ 1 and ≤ 5)"),
        (("--learning_rate", "-1"), None, "learning_rate=-1.0 (valid: a finite number > 0)"),
        (("--eta", "inf"), None, "eta=inf (valid: a finite number > 0)"),
        ((), "pairs_per_iteration: 4.5", "pairs_per_iteration=4.5 (valid: an integer ≥ 2)"),
        (
            ("--user_backend", "openai", "--user_base_url", "localhost:8000"),
            None,
            "user_base_url='localhost:8000' (valid: the server's http(s) URL",
        ),
        (("--max_new_tokens", "9000"), None, "max_new_tokens=9000 (valid: below max_dialogue_tokens"),
    ],
)
def test_plan_refuses_what_train_refuses(
    flags: tuple[str, ...], yaml_line: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """refuel-plan runs the same field and combination check as refuel-train (declared once, on the fields and in
    refuel.config.RULES), before anything else: exit 2 with what is valid."""
    config = tmp_path / "run.yaml"
    config.write_text((REPO / "configs" / "cpu_main.yaml").read_text() + (yaml_line or "") + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_plan_reads_a_scalar_task_as_one_task(tmp_path: Path, offline: None) -> None:
    config = tmp_path / "run.yaml"
    config.write_text((REPO / "configs" / "cpu_main.yaml").read_text() + "tasks: Math_CoT\n")
    plan = make_plan(parse_config(RefuelConfig, ["--config", str(config)], description="test"))
    assert any("tasks Math_CoT;" in line for line in plan.lines), plan.lines


def test_plan_says_when_a_run_writes_no_training_checkpoint(offline: None) -> None:
    """The main job (6 steps) gets a checkpoint by time by default; without one the plan warns."""
    main_job = ["--config", str(REPO / "configs" / "cpu_main.yaml")]
    plan = make_plan(parse_config(RefuelConfig, main_job, description="test"))
    assert not any("no training checkpoint" in warning for warning in plan.warnings)
    assert any(line.startswith("checkpoints") and "2 min" in line for line in plan.lines)
    plan = make_plan(parse_config(RefuelConfig, [*main_job, "--checkpoint_minutes", "0"], description="test"))
    assert any("no training checkpoint will be written (≤ 6 steps" in warning for warning in plan.warnings)


def test_plan_refuses_an_output_dir_that_is_not_a_run(tiny_model_path: str, offline: None) -> None:
    plan = make_plan(parse_config(RefuelConfig, ["--output_dir", tiny_model_path], description="test"))
    assert any("not a refuel-train run" in error for error in plan.errors), plan.errors


def test_plan_shows_the_engine_precision_and_its_reason() -> None:
    line = next(line for line in _plan("--engine_dtype", "float32").lines if line.startswith("precision"))
    assert "engines float32 (engine_dtype=float32 as set)" in line and line.endswith("training float32")
    auto = next(line for line in _plan().lines if line.startswith("precision"))
    assert "(auto: the " in auto  # the reason names what the processor has
