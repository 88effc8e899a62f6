"""Command lines generated from the config dataclasses, with YAML/JSON ``--config`` defaults."""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from dialogsim.console import UsageError
from refuel.cli import parse_config
from refuel.config import RefuelConfig
from refuel.evaluation.evaluate import EvaluateConfig


def test_flags_set_fields() -> None:
    """Flags set scalar, optional and list fields with the dataclass types; the rest keep their defaults."""
    config = parse_config(
        RefuelConfig,
        [
            "--eta",
            "2.5",
            "--holdout",
            "3",
            "--tasks",
            "Math_CoT",
            "Coding",
            "--prompts",
            "p.jsonl",
            "--output-dir",
            "o",
        ],
        description="test",
    )
    assert isinstance(config, RefuelConfig)
    assert config.eta == 2.5 and isinstance(config.eta, float)
    assert config.holdout == 3 and isinstance(config.holdout, int)
    assert config.tasks == ["Math_CoT", "Coding"]
    assert config.prompts == "p.jsonl"
    assert config.output_dir == "o"  # the dashed alias of --output_dir
    defaults = RefuelConfig()
    changed = {"eta", "holdout", "tasks", "prompts", "output_dir"}
    for field in fields(RefuelConfig):
        if field.name not in changed:
            assert getattr(config, field.name) == getattr(defaults, field.name), field.name


def test_no_flags_give_the_dataclass_defaults() -> None:
    """An empty command line equals RefuelConfig()."""
    assert parse_config(RefuelConfig, [], description="test") == RefuelConfig()


def test_yaml_config_sets_defaults_and_flags_override(tmp_path: Path) -> None:
    """A YAML --config sets fields; a flag beats the file whichever side of --config it is on."""
    path = tmp_path / "run.yaml"
    path.write_text("eta: 3.0\nlearning_rate: 1e-3\ntasks: [Math_CoT, Logic]\nprompts: null\nepochs: 4\n")
    for argv in (["--config", str(path), "--eta", "5"], ["--eta", "5", "--config", str(path)]):
        config = parse_config(RefuelConfig, argv, description="test")
        assert config.eta == 5.0  # flag wins
        assert config.learning_rate == pytest.approx(1e-3) and isinstance(config.learning_rate, float)  # YAML "1e-3"
        assert config.tasks == ["Math_CoT", "Logic"]
        assert config.prompts is None
        assert config.epochs == 4
        assert config.holdout == RefuelConfig().holdout  # not in the file: dataclass default


def test_json_config_is_read(tmp_path: Path) -> None:
    """A .json --config is parsed as JSON."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"pairs_per_iteration": 8, "datasets": ["gsm8k", "MATH"], "seed": 7}))
    config = parse_config(RefuelConfig, ["--config", str(path)], description="test")
    assert (config.pairs_per_iteration, config.datasets, config.seed) == (8, ["gsm8k", "MATH"], 7)


def test_unknown_config_key_is_a_usage_error_naming_the_key(tmp_path: Path) -> None:
    """An unknown key in the config file is a UsageError (commands exit 2) whose message names the key and file."""
    path = tmp_path / "run.yaml"
    path.write_text("eta: 2.0\nlearnig_rate: 1e-5\n")
    with pytest.raises(UsageError, match="learnig_rate") as raised:
        parse_config(RefuelConfig, ["--config", str(path)], description="test")
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.yaml", None, "--config {path}: file not found"),
        ("list.yaml", "- eta\n- 2\n", "--config {path}: expected a mapping"),
        ("broken.yaml", "seed: 1\neta: [1,\n", "{path}:3:1: expected the node content, but found '<stream end>'"),
        ("indent.yaml", "seed: 1\n eta: 2\n", "{path}:2:5: mapping values are not allowed here"),
        ("broken.json", '{"seed": 1,\n "eta": }', "{path}:2:9: Expecting value"),
    ],
)
def test_bad_config_file_is_a_usage_error_naming_file_line_column(
    tmp_path: Path, name: str, text: str | None, message: str
) -> None:
    """A missing config file, one that is not a mapping, or one with a syntax error (file:line:column, 1-based,
    instead of PyYAML's traceback naming ``<unicode string>``) is a UsageError saying so."""
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(UsageError) as raised:
        parse_config(RefuelConfig, ["--config", str(path)], description="test")
    assert str(raised.value).startswith(message.format(path=path)), str(raised.value)


def test_unknown_flag_is_rejected_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped flag is never silently ignored: the error names it."""
    with pytest.raises((SystemExit, ValueError)) as raised:
        parse_config(RefuelConfig, ["--etta", "2"], description="test")
    assert "--etta" in str(raised.value) + capsys.readouterr().err


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown flag exits like argparse (SystemExit 2) with the flag named on stderr."""
    with pytest.raises(SystemExit) as raised:
        parse_config(RefuelConfig, ["--etta", "2"], description="test")
    assert raised.value.code == 2
    assert "--etta" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--eta", "0"], "eta"),
        (["--temperature", "-1"], "temperature"),
        (["--validation_fraction", "1.0"], "validation_fraction"),
        (["--pairs_per_iteration", "1"], "pairs_per_iteration"),
    ],
)
def test_invalid_values_raise_value_error(argv: list[str], field: str, tmp_path: Path) -> None:
    """Out-of-range values raise ValueError from RefuelConfig.__post_init__, naming the field, from flags or file."""
    with pytest.raises(ValueError, match=field):
        parse_config(RefuelConfig, argv, description="test")
    path = tmp_path / "bad.yaml"
    path.write_text(f"{argv[0].removeprefix('--')}: {argv[1]}\n")
    with pytest.raises(ValueError, match=field):
        parse_config(RefuelConfig, ["--config", str(path)], description="test")
    with pytest.raises(ValueError, match=field):
        RefuelConfig(**{field: type(getattr(RefuelConfig(), field))(argv[1])})


def test_evaluate_config_parsing(tmp_path: Path) -> None:
    """EvaluateConfig flags and --config work the same way (list of candidates, ints, override)."""
    config = parse_config(
        EvaluateConfig,
        ["--candidates", "runs/a/iteration_0/policy", "runs/b", "--n_prompts", "3", "--horizon", "2"],
        description="test",
    )
    assert config.candidates == ["runs/a/iteration_0/policy", "runs/b"]
    assert (config.n_prompts, config.horizon) == (3, 2)
    assert config.baseline == EvaluateConfig().baseline
    path = tmp_path / "eval.yaml"
    path.write_text("holdout: 8\nhorizon: 4\nbaseline: some/model\n")
    config = parse_config(EvaluateConfig, ["--config", str(path), "--horizon", "5"], description="test")
    assert (config.holdout, config.horizon, config.baseline) == (8, 5, "some/model")


@pytest.mark.parametrize("module", ["refuel.training.iterations", "refuel.evaluation.evaluate", "refuel.plan"])
def test_help_prints_every_flag(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--help renders (argparse %-formats help lines, so a literal % must be escaped) and exits 0."""
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--output_dir" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--method", "ppo"], "method"),
        (["--rollin", "somewhere"], "rollin"),
        (["--method", "dpo_lt", "--rollin", "initial"], "rollin"),  # the LT baselines roll in with π_ref only
        (["--rollin", "dataset"], "offline_dialogues"),
        (["--backend", "openai"], "backend"),
        (["--user_backend", "openai"], "user_base_url"),
    ],
)
def test_invalid_combinations_name_the_field(argv: list[str], field: str) -> None:
    """Settings that cannot work together are refused when the config is built, naming the field."""
    with pytest.raises(ValueError, match=field):
        parse_config(RefuelConfig, argv, description="test")


@pytest.mark.parametrize(
    ("yaml_line", "message"),
    [
        ("pairs_per_iteration: 4.5", "pairs_per_iteration=4.5 (valid: an integer ≥ 2)"),
        ("max_horizon: 9", "max_horizon=9 (valid: an integer ≥ 1 and ≤ 5)"),
        ("max_horizon: 0", "max_horizon=0 (valid: an integer ≥ 1 and ≤ 5)"),
        ("eta: .inf", "eta=inf (valid: a finite number > 0)"),
        ("learning_rate: -1", "learning_rate=-1.0 (valid: a finite number > 0)"),
        ("top_p: 1.5", "top_p=1.5 (valid: a finite number > 0 and ≤ 1)"),
        ("mixed_precision: no", "mixed_precision=False (valid: a string"),
        ("datasets: [1, 2]", "datasets=[1, 2] (valid: a list of strings)"),
    ],
)
def test_config_file_values_are_checked_for_type_and_range(yaml_line: str, message: str, tmp_path: Path) -> None:
    """Values from a YAML file bypass argparse's types: the field check refuses them with the valid range."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_line + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_config(RefuelConfig, ["--config", str(path)], description="test")


def test_a_scalar_task_in_a_config_file_is_one_task(tmp_path: Path) -> None:
    """``tasks: Math_CoT`` is the one task Math_CoT, not the letters M, a, t, h, …"""
    path = tmp_path / "run.yaml"
    path.write_text("tasks: Math_CoT\n")
    assert parse_config(RefuelConfig, ["--config", str(path)], description="test").tasks == ["Math_CoT"]


@pytest.mark.parametrize("argv", [["--eta", "inf"], ["--learning_rate", "nan"], ["--max_horizon", "6"]])
def test_non_finite_or_out_of_range_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(ValueError, match=argv[0].removeprefix("--") + "="):
        parse_config(RefuelConfig, argv, description="test")


def test_literal_choices_match_the_registries_they_name() -> None:
    """The configs' Literal choices are the runtime registries' keys (a new template or engine needs both)."""
    from typing import get_args, get_type_hints

    from dialogsim.backends.factory import BACKENDS
    from dialogsim.backends.serving import ServingEngine
    from dialogsim.user import REPLAY, TEMPLATES
    from envs.config import PolicyBackend, UserBackend, UserConfig

    hints = get_type_hints(UserConfig)
    assert set(get_args(hints["user_template"])) == {*TEMPLATES, REPLAY}
    assert set(get_args(PolicyBackend)) == set(ServingEngine.SYNCABLE)
    assert set(get_args(UserBackend)) == {"auto", *BACKENDS}
