"""Settings declared once, on the field (dialogsim/settings.py): every config field of every settings class has its
default, help, fingerprint membership and (numeric) range there, and nothing declares them a second time."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import pytest

import dialogsim.data
import dialogsim.sampling
import dialogsim.simulator
import envs.config
import refuel.config
from dialogsim.console import UsageError
from dialogsim.data import PromptConfig, load_prompt_rows
from dialogsim.sampling import SamplingParams
from dialogsim.settings import SHAPES, Range, check_settings, default_of, field_names, same_as, setting, union_members
from dialogsim.simulator import EpisodeConfig
from envs.build import build_simulator
from envs.config import SimulatorConfig
from refuel.config import COLLECTION_FIELDS, GENERATION_FIELDS, TRAINING_FIELDS, EvaluateConfig, RefuelConfig

SETTINGS_MODULES = (dialogsim.data, dialogsim.sampling, dialogsim.simulator, envs.config, refuel.config)
SETTINGS_CLASSES = sorted(
    {
        value
        for module in SETTINGS_MODULES
        for value in vars(module).values()
        if isinstance(value, type)
        and dataclasses.is_dataclass(value)
        and (value.__name__.endswith("Config") or value is SamplingParams)
    },
    key=lambda cls: f"{cls.__module__}.{cls.__qualname__}",
)
# The same name for two settings of different scope, each declared once in its own class.
DISTINCT_SETTINGS = {
    "horizon": "EvaluationConfig's H of every evaluation dialogue (3) vs an episode's fixed H or none (EpisodeConfig)",
    "output_dir": "refuel-train's run folder (RunConfig) vs refuel-evaluate's report folder (CandidatesConfig)",
    "seed": "a command's seed (SeedConfig) vs one engine call's sampling seed (SamplingParams)",
}


def _is_numeric(annotation: Any) -> bool:
    return any(option in (int, float) for option in union_members(annotation))


def test_the_walk_covers_every_settings_class() -> None:
    names = {cls.__name__ for cls in SETTINGS_CLASSES}
    assert {"PromptConfig", "EpisodeConfig", "SamplingParams", "SimulatorConfig", "UserConfig", "RewardConfig"} <= names
    assert {"EngineConfig", "UserEngineConfig", "VLLMConfig", "SamplingConfig", "CollectionConfig"} <= names
    assert {"TrainingConfig", "RunConfig", "RefuelConfig", "EvaluateConfig", "JudgeConfig"} <= names


@pytest.mark.parametrize("config", SETTINGS_CLASSES, ids=lambda cls: cls.__name__)
def test_every_field_declares_its_default_help_fingerprint_and_range(config: type) -> None:
    """Each field is a setting(): a default, a help line, ``shapes`` (fingerprint membership) and, for a number, a
    range; the class builds with its defaults (so every default lies in its range)."""
    hints = typing.get_type_hints(config)
    for spec in dataclasses.fields(config):
        where = f"{config.__name__}.{spec.name}"
        assert spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING, where
        assert isinstance(spec.metadata.get("help"), str) and spec.metadata["help"], f"{where}: no help"
        assert "shapes" in spec.metadata and spec.metadata["shapes"] in (*SHAPES, None), f"{where}: no shapes"
        valid = spec.metadata.get("valid")
        if _is_numeric(hints[spec.name]):
            assert isinstance(valid, Range), f"{where}: a number without a range"
            default = default_of(spec)
            assert default is None or default in valid, f"{where}: default {default!r} outside {valid}"
        else:
            assert valid is None, f"{where}: a range on a field that is not a number"
    config()


def test_each_setting_is_declared_once() -> None:
    """A name in several classes is one declaration taken over with same_as (same default, range, help, shapes),
    except the few names that are distinct settings of distinct scopes (DISTINCT_SETTINGS)."""
    declarations: dict[str, set[tuple[Any, ...]]] = {}
    for config in SETTINGS_CLASSES:
        for spec in dataclasses.fields(config):
            key = (repr(default_of(spec)), tuple(sorted((k, repr(v)) for k, v in spec.metadata.items())))
            declarations.setdefault(spec.name, set()).add(key)
    twice = {name: keys for name, keys in declarations.items() if len(keys) > 1}
    assert set(twice) == set(DISTINCT_SETTINGS), twice
    for name in DISTINCT_SETTINGS:
        assert len(twice[name]) == 2


def test_functions_that_take_settings_by_name_keep_the_declared_defaults() -> None:
    """build_simulator and load_prompt_rows take settings through the configs (no default of their own beyond the
    declared one); the verifiers adapter's fields take default and help from the declarations (the simulator's:
    envs does not import refuel, whose π_0 help line is the command's)."""
    declared = {spec.name: spec for cls in SETTINGS_CLASSES for spec in dataclasses.fields(cls)}
    simulator_side = set(field_names(SimulatorConfig, EpisodeConfig))
    for function in (build_simulator, load_prompt_rows):
        for parameter in inspect.signature(function).parameters.values():
            if parameter.name in declared and parameter.default is not inspect.Parameter.empty:
                assert parameter.default == default_of(declared[parameter.name]), (function.__name__, parameter.name)
    adapters = pytest.importorskip("envs.adapters.verifiers_env")
    for model in (adapters.DialogsimTasksetConfig, adapters.DialogsimEnvConfig):
        for name, info in model.model_fields.items():
            if name in declared and name not in DISTINCT_SETTINGS:
                spec = declared[name]
                assert info.get_default(call_default_factory=True) == default_of(spec), (model.__name__, name)
                assert name not in simulator_side or info.description == spec.metadata["help"], (model.__name__, name)


def test_fingerprints_follow_what_each_field_shapes() -> None:
    """The run stages' records and the evaluation's cache key are read off the fields' ``shapes``."""
    assert set(COLLECTION_FIELDS) == set(field_names(RefuelConfig, shapes=("dialogues", "pairs")))
    assert set(COLLECTION_FIELDS) < set(TRAINING_FIELDS)
    assert {"reward", "pairs_per_iteration", "temperature", "user_backend"} <= set(COLLECTION_FIELDS)
    assert {"eta", "learning_rate"} <= set(TRAINING_FIELDS) - set(COLLECTION_FIELDS)
    unshaped = {"output_dir", "iterations", "vllm_kv_cache_gib", "vllm_tensor_parallel_size", "user_base_url"}
    unshaped |= {"gradient_checkpointing", "effective_batch_size", "checkpoint_every", "restart_stage"}
    assert not unshaped & set(TRAINING_FIELDS)
    assert {"temperature", "horizon", "n_prompts", "user_backend"} <= set(GENERATION_FIELDS)
    assert not {"reward", "judge", "candidates", "vllm_kv_cache_gib"} & set(GENERATION_FIELDS)


def test_misplaced_fields_sit_in_their_groups() -> None:
    assert {"gradient_checkpointing", "effective_batch_size"} <= set(field_names(refuel.config.TrainingConfig))
    assert "vllm_tensor_parallel_size" in field_names(envs.config.VLLMConfig)
    assert not {"gradient_checkpointing", "effective_batch_size", "vllm_tensor_parallel_size"} & set(
        field_names(refuel.config.RunConfig)
    )
    assert "vllm_tensor_parallel_size" in field_names(EvaluateConfig)  # refuel-evaluate's engines take it too


def test_drifting_defaults_are_one() -> None:
    """The defaults that had two values: the commands' (refuel/config.py) won."""
    assert SamplingParams().max_new_tokens == RefuelConfig().max_new_tokens == 160
    assert SimulatorConfig().user_backend == RefuelConfig().user_backend == "auto"
    assert EpisodeConfig().max_horizon == RefuelConfig().max_horizon
    assert EpisodeConfig().max_dialogue_tokens == SimulatorConfig().max_dialogue_tokens


@pytest.mark.parametrize(
    ("config", "values", "message"),
    [
        (SimulatorConfig, {"holdout": -1}, "holdout=-1 (valid: an integer ≥ 0)"),
        (SimulatorConfig, {"tasks": "Math_CoT"}, "tasks='Math_CoT' (valid: a list of strings)"),
        (SimulatorConfig, {"user_backend": "openai"}, "user_base_url=None (valid: the server's http(s) URL"),
        (SimulatorConfig, {"vllm_tensor_parallel_size": 0}, "vllm_tensor_parallel_size=0 (valid: an integer ≥ 1)"),
        (EpisodeConfig, {"max_horizon": 7}, "max_horizon=7 (valid: an integer ≥ 1 and ≤ 5)"),
        (EpisodeConfig, {"max_horizon": 2, "horizon": 3}, "horizon=3 (valid: at most max_horizon"),
        (SamplingParams, {"top_p": 0.0}, "top_p=0.0 (valid: a finite number > 0 and ≤ 1)"),
        (SamplingParams, {"max_new_tokens": 0}, "max_new_tokens=0 (valid: an integer ≥ 1)"),
        (RefuelConfig, {"temperature": 0.0}, "temperature=0.0 (valid: > 0 for training"),
    ],
)
def test_each_class_checks_itself(config: type, values: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as error:
        config(**values)
    assert message in str(error.value)


def test_evaluation_takes_greedy_decoding() -> None:
    assert EvaluateConfig(temperature=0.0).temperature == 0.0  # the training rule needs eta, which it has not


def test_a_path_for_prompts_is_its_string(tmp_path: Any) -> None:
    assert PromptConfig(prompts=tmp_path / "p.jsonl").prompts == str(tmp_path / "p.jsonl")


def test_same_as_takes_the_declaration_over() -> None:
    @dataclasses.dataclass
    class Source:
        size: int = setting(3, help="a size", shapes="pairs", valid=Range(1))

    @dataclasses.dataclass
    class Copy:
        size: int = same_as(Source, "size")

    (spec,) = dataclasses.fields(Copy)
    assert (spec.default, dict(spec.metadata)) == (3, {"help": "a size", "shapes": "pairs", "valid": Range(1)})
    with pytest.raises(UsageError, match=r"size=0 \(valid: an integer ≥ 1\)"):
        check_settings(Copy(0))
    with pytest.raises(KeyError, match="Source has no field 'width'"):
        same_as(Source, "width")
