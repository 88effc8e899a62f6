"""One decision of engine precision: ``auto`` from the processor's flags, the setting's range, the warning for an
emulated dtype, the CPU flag parser, and the decision in a run's provenance."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from dialogsim.precision import ENGINE_DTYPES, Hardware, cpu_info, engine_dtype, training_dtype
from refuel.config import EvaluateConfig, RefuelConfig
from refuel.provenance import run_provenance

SAPPHIRE_RAPIDS = Hardware("cpu", "Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
ZEN4 = Hardware("cpu", "AMD EPYC 9R14", frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}))
ZEN2 = Hardware("cpu", "AMD EPYC 7R32", frozenset({"avx2", "fma"}))
GRAVITON3 = Hardware("cpu", "Neoverse-V1", frozenset({"asimd", "bf16", "sve"}))
A100 = Hardware("cuda", "NVIDIA A100", cuda_bf16=True)
V100 = Hardware("cuda", "Tesla V100", cuda_bf16=False)


@pytest.mark.parametrize(
    ("hardware", "dtype"),
    [(SAPPHIRE_RAPIDS, "bfloat16"), (ZEN4, "bfloat16"), (GRAVITON3, "bfloat16"), (ZEN2, "float32"),
     (A100, "bfloat16"), (V100, "float32")],
)  # fmt: skip
def test_auto_picks_bf16_only_where_the_hardware_executes_it(hardware: Hardware, dtype: str) -> None:
    decision = engine_dtype("auto", hardware)
    assert decision.dtype == dtype
    assert decision.requested == "auto" and decision.reason.startswith("auto: ")
    assert decision.hardware == hardware.summary()
    assert decision.torch_dtype == getattr(torch, dtype)


def test_auto_on_a_cpu_without_bf16_names_the_reason_and_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decision = engine_dtype("auto", ZEN2)
    assert "no native bf16" in decision.reason
    assert "avx2 fma" in decision.hardware and "avx512_bf16" not in decision.hardware


def test_forcing_bf16_on_an_avx2_only_cpu_runs_with_a_warning_naming_the_slowdown() -> None:
    with pytest.warns(RuntimeWarning, match=r"lacks native bfloat16 arithmetic.*6\.2x slower"):
        decision = engine_dtype("bfloat16", ZEN2)
    assert decision.dtype == "bfloat16" and "emulated" in decision.reason


def test_explicit_dtypes_on_native_hardware_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine_dtype("bfloat16", SAPPHIRE_RAPIDS).dtype == "bfloat16"
        assert engine_dtype("float32", ZEN2).dtype == "float32"
        assert engine_dtype("float16", A100).dtype == "float16"
    with pytest.warns(RuntimeWarning, match="float16"):
        engine_dtype("float16", ZEN4)  # no avx512_fp16 / amx_fp16: emulated


@pytest.mark.parametrize("value", ["fp32", "bf16", "Auto", "float64", ""])
def test_engine_dtype_refuses_values_outside_its_range(value: str) -> None:
    with pytest.raises(ValueError, match=r"engine_dtype=.*valid: auto \| float32 \| bfloat16 \| float16"):
        engine_dtype(value, ZEN2)


@pytest.mark.parametrize("config_class", [RefuelConfig, EvaluateConfig])
def test_the_commands_configs_check_the_setting(config_class: type) -> None:
    assert config_class().engine_dtype == "auto"
    for value in ENGINE_DTYPES:
        assert config_class(engine_dtype=value).engine_dtype == value
    with pytest.raises(ValueError, match="engine_dtype"):
        config_class(engine_dtype="bf16")


def test_gym_make_refuses_a_bad_engine_dtype_before_loading_anything(shared_prompts: Path) -> None:
    import gymnasium as gym

    import envs  # noqa: F401 (registers the ids)

    with pytest.raises(ValueError, match="engine_dtype='fp16'"):
        gym.make("dialogsim/UltraInteract-v0", prompts=str(shared_prompts), engine_dtype="fp16", user_model="nope/x")


def test_cpu_info_reads_x86_and_arm_flags(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 7R32\nflags\t\t: fpu avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 7R32\nflags\t\t: fpu avx2 fma\n"
    )
    assert cpu_info(x86) == ("AMD EPYC 7R32", frozenset({"fpu", "avx2", "fma"}))
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd bf16 sve\nModel\t: Neoverse-V1\n")
    name, flags = cpu_info(arm)
    assert name == "Neoverse-V1" and "bf16" in flags
    assert cpu_info(tmp_path / "absent")[1] == frozenset()


def test_this_machines_decision_follows_its_own_flags() -> None:
    hardware = Hardware.detect()
    assert engine_dtype("auto").dtype == ("bfloat16" if hardware.native_bf16 else "float32")


def test_training_stays_float32() -> None:
    assert training_dtype() == torch.float32


def test_provenance_records_the_decision_with_its_reason() -> None:
    decision = engine_dtype("auto", ZEN2)
    record = run_provenance({}, [], decision)["engine_precision"]
    assert record == {
        "requested": "auto",
        "dtype": "float32",
        "reason": "auto: the cpu has no native bf16, float32 is fastest",
        "hardware": ZEN2.summary(),
    }


@pytest.mark.parametrize(("hardware", "dtype"), [(SAPPHIRE_RAPIDS, "float32"), (ZEN2, "float32"), (A100, "bfloat16")])
def test_auto_keeps_scoring_models_float32_on_cpus(hardware: Hardware, dtype: str) -> None:
    """Reward models and the embedder: batch-invariant float32 scores on CPUs, bf16 on GPUs that have it."""
    assert engine_dtype("auto", hardware, role="scoring").dtype == dtype
    assert engine_dtype("bfloat16", SAPPHIRE_RAPIDS, role="scoring").dtype == "bfloat16"  # an explicit setting wins
