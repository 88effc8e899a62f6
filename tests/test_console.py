"""Every command's error convention (dialogsim.console): refusals exit 2 with one ``error:`` line, failures exit 1
with the cause and what was left on disk, a traceback only with ``--debug`` / ``DIALOGSIM_DEBUG=1``.

The first tests drive :func:`console_command` and the commands' ``main`` in-process (fast); the ``slow`` ones run
each real console script, ``python -m`` entry and bench script in a subprocess with the worktree's code first on
``PYTHONPATH``, as a user runs them, with the hub off.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dialogsim.console import DEBUG_ENV, Command, UsageError, console_command, failure_state
from refuel import plan
from refuel.evaluation import evaluate
from refuel.run_folder import RUN_MARKER, describe_run
from refuel.training import iterations

REPO = Path(__file__).resolve().parents[1]
BROKEN_YAML = "seed: 1\neta: [1,\n"


@console_command
def _example(argv: list[str]) -> int:
    """A command that refuses ``refuse``, fails on ``fail`` (in a failure_state) and returns 0 otherwise."""
    if "refuse" in argv:
        raise UsageError("--thing refuse: not a thing; give another")
    with failure_state(lambda: "run folder x: iteration_0 done"):
        if "fail" in argv:
            raise RuntimeError("engine died\nwhile generating")
    return 0


def _exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:
    with pytest.raises(SystemExit) as raised:
        _example(argv)
    return raised.value.code, capsys.readouterr().err


def test_a_refusal_exits_2_with_its_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit(["refuse"], capsys)
    assert (code, err) == (2, "error: --thing refuse: not a thing; give another\n")


def test_a_failure_exits_1_with_the_cause_and_the_state_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit(["fail"], capsys)
    assert code == 1
    assert err == (
        "error: RuntimeError: engine died while generating; run folder x: iteration_0 done; "
        "rerun with --debug for the traceback\n"
    )


def test_debug_flag_or_variable_lets_the_exception_through(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--debug anywhere (removed before main sees it) or DIALOGSIM_DEBUG=1: the exception itself, with the state."""
    with pytest.raises(RuntimeError, match="engine died") as raised:
        _example(["fail", "--debug"])
    assert raised.value.dialogsim_state == "run folder x: iteration_0 done"
    with pytest.raises(UsageError):
        _example(["--debug", "refuse"])
    assert _example(["--debug"]) == 0  # main never sees --debug
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UsageError):
        _example(["refuse"])
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert _exit(["refuse"], capsys)[0] == 2


def _main_exit(main: Command, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:
    """Run a command's ``main`` in-process; it must exit: its status and stderr."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code, capsys.readouterr().err


def test_train_refuses_a_non_finite_eta_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 28, row 1: the right message, now alone on one line with exit 2."""
    code, err = _main_exit(
        iterations.main, ["--config", str(REPO / "configs" / "cpu_main.yaml"), "--eta", "inf"], capsys
    )
    assert (code, err) == (2, "error: invalid RefuelConfig values: eta=inf (valid: a finite number > 0)\n")


@pytest.mark.parametrize("main", [iterations.main, plan.main, evaluate.main])
def test_broken_yaml_names_file_line_and_column(
    main: Command, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 28, row 2: `eta: [1,` is refused as <file>:<line>:<column>, not PyYAML's `<unicode string>`."""
    path = tmp_path / "x.yaml"
    path.write_text(BROKEN_YAML)
    code, err = _main_exit(main, ["--config", str(path)], capsys)
    assert code == 2
    assert err.startswith(f"error: {path}:3:1: expected the node content") and err.count("\n") == 1, err


def test_train_refuses_tasks_its_reward_cannot_score_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 28, row 3: `--tasks Chat` with the default reward; nothing is written."""
    code, err = _main_exit(iterations.main, ["--tasks", "Chat", "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and err.startswith("error: --reward math scores only Math* rows, not the selected task(s) Chat")
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("main", [iterations.main, evaluate.main])
def test_a_missing_prompt_file_is_refused_in_one_line_before_anything_is_written(
    main: Command, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "prompts.jsonl"
    code, err = _main_exit(main, ["--prompts", str(missing), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith(f"error: prompt source '{missing}' is neither a file") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("candidate", "problem", "closest"),
    [
        ("runs/nope", "the hub is off (HF_HUB_OFFLINE=1)", "runs/refuel"),  # a hub id's form: not in the cache
        ("runs/refuel/iteration_0/polcy", "no such folder, and not a hub id", "runs/refuel/iteration_0/policy"),
    ],
)
def test_evaluate_refuses_a_mistyped_run_folder_offline_before_anything_loads(
    candidate: str,
    problem: str,
    closest: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 28, row 4: `--candidates runs/nope` with the hub off is refused at once, naming the closest folder."""
    policy = tmp_path / "runs" / "refuel" / "iteration_0" / "policy"
    policy.mkdir(parents=True)
    (policy / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    argv = ["--config", str(REPO / "configs" / "cpu_eval.yaml"), "--output_dir", "eval"]
    code, err = _main_exit(evaluate.main, [*argv, "--candidates", candidate], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"error: candidates='{candidate}': {problem}" in err and f"the closest existing name is '{closest}'" in err
    assert not (tmp_path / "eval").exists()


def test_describe_run_says_where_each_iteration_stopped(tmp_path: Path) -> None:
    """The state in refuel-train's failure line: done iterations, collected batches, and that a rerun resumes."""
    assert describe_run(tmp_path / "run") == f"nothing was written to {tmp_path / 'run'}"
    stages = {f"iteration_{t}": {"collection": {}} for t in range(3)}
    (tmp_path / RUN_MARKER).write_text(json.dumps({"format": "refuel-train run", "stages": stages}))
    (tmp_path / "iteration_0").mkdir()
    (tmp_path / "iteration_0" / "metrics.json").write_text("{}")
    (tmp_path / "iteration_1" / "shards").mkdir(parents=True)
    (tmp_path / "iteration_1" / "shards" / "manifest.json").write_text(json.dumps({"batches": {"0": {}, "1": {}}}))
    assert describe_run(tmp_path) == (
        f"run folder {tmp_path}: iteration_0 done, iteration_1 collecting (2 batch(es) in shards/), "
        "iteration_2 collecting (0 batch(es) in shards/); the same command resumes from there"
    )


def _command(name: str) -> list[str]:
    """The installed console script ``name`` (it imports the worktree's code: PYTHONPATH comes first)."""
    script = Path(sysconfig.get_path("scripts")) / name
    assert script.is_file(), f"{script} is not installed; run scripts/setup.sh"
    return [str(script)]


def _run(command: list[str], cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess[str]:
    environ = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    environ.pop(DEBUG_ENV, None)
    return subprocess.run(command, cwd=cwd, env=environ | env, capture_output=True, text=True, timeout=300, check=False)


def _refused(result: subprocess.CompletedProcess[str], message: str, code: int = 2) -> None:
    """Exit ``code``, no traceback, ``message`` on the last stderr line (log lines may come before it)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == code, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["refuel-train", "--config", "configs/cpu_main.yaml", "--eta", "inf"], "eta=inf (valid: a finite number > 0)"),
        (["refuel-train", "--config", "{broken}"], "{broken}:3:1: expected the node content"),
        (["refuel-train", "--tasks", "Chat", "--output_dir", "{tmp}/run"], "--reward math scores only Math* rows"),
        (["refuel-plan", "--config", "configs/cpu_main.yaml", "--tasks", "Chat"], "--reward math_format scores only"),
        (
            ["refuel-evaluate", "--config", "configs/cpu_eval.yaml", "--candidates", "runs/nope"],
            "candidates='runs/nope': the hub is off (HF_HUB_OFFLINE=1)",
        ),
    ],
)
def test_console_scripts_refuse_in_one_line(command: list[str], message: str, tmp_path: Path) -> None:
    """The issue's table through the real console scripts: exit 2, one `error:` line, no traceback."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN_YAML)
    argv = [arg.format(broken=broken, tmp=tmp_path) for arg in command[1:]]
    _refused(_run([*_command(command[0]), *argv]), message.format(broken=broken))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_debug_shows_the_traceback_in_a_subprocess(tmp_path: Path) -> None:
    """--debug or DIALOGSIM_DEBUG=1: Python's traceback, ending with the UsageError, exit status 1."""
    argv = [*_command("refuel-train"), "--config", "configs/cpu_main.yaml", "--eta", "inf"]
    for result in (_run([*argv, "--debug"]), _run(argv, **{DEBUG_ENV: "1"})):
        assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
        assert "dialogsim.console.UsageError: invalid RefuelConfig values: eta=inf" in result.stderr


@pytest.mark.slow
def test_a_failure_during_the_work_exits_1_with_the_run_folder_state(
    tmp_path: Path, tiny_model_path: str, shared_prompts: Path
) -> None:
    """A user model folder that holds no model passes the name check, then fails to load during the work: exit 1,
    the cause and the run folder's state on one line."""
    not_a_model = tmp_path / "user"
    not_a_model.mkdir()
    flags = ["--policy_model", tiny_model_path, "--user_model", str(not_a_model), "--prompts", str(shared_prompts)]
    result = _run([*_command("refuel-train"), *flags, "--holdout", "0", "--output_dir", str(tmp_path / "run")])
    _refused(result, f"; run folder {tmp_path / 'run'}: iteration_0 collecting (0 batch(es) in shards/); ", code=1)
    assert re.search(r"^error: \w+Error: ", result.stderr.splitlines()[-1]), result.stderr[-3000:]
    assert result.stderr.endswith("the same command resumes from there; rerun with --debug for the traceback\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("refuel.evaluation.analysis", ["--run_dir", "{tmp}/nothing"], "--run_dir {tmp}/nothing: no such folder"),
        ("refuel.manifests", ["--eval_config", "{eval}", "--check"], "select prompts differently (['holdout'])"),
        ("envs.adapters.openenv_server", ["--reward", "no_such_module:score"], "--reward no_such_module:score"),
        ("envs.adapters.openenv_server", ["--user_model", "runs/nope"], "user_model='runs/nope'"),
    ],
)
def test_python_m_entries_refuse_in_one_line(module: str, argv: list[str], message: str, tmp_path: Path) -> None:
    eval_config = tmp_path / "eval.yaml"
    eval_config.write_text((REPO / "configs" / "cpu_eval.yaml").read_text() + "holdout: 8\n")
    values = {"tmp": tmp_path, "eval": eval_config}
    result = _run([sys.executable, "-m", module, *(arg.format(**values) for arg in argv)])
    _refused(result, message.format(**values))


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [
        "collection_throughput",
        "engine_precision",
        "generation_profile",
        "memory",
        "reference_design",
        "reward_headroom",
        "train_throughput",
    ],
)
def test_bench_scripts_refuse_an_unknown_model_in_one_line(script: str) -> None:
    result = _run([sys.executable, "-m", f"bench.{script}", "--model", "runs/nope"])
    _refused(result, "--model='runs/nope': the hub is off")


@pytest.mark.slow
def test_gpu_check_and_sandbox_bench_exit_2_without_a_traceback() -> None:
    """gpu_check without CUDA (its own exit 2) and a bad flag of the sandbox bench (argparse's exit 2)."""
    if not __import__("torch").cuda.is_available():
        result = _run([sys.executable, "scripts/gpu_check.py", "check"])
        assert result.returncode == 2 and "Traceback" not in result.stderr and "no CUDA device" in result.stderr
    result = _run([sys.executable, "-m", "bench.sandbox_overhead", "--rows", "many"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: argument --rows: invalid int value: 'many'" in result.stderr
