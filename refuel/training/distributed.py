"""What the launch asked for versus what ``accelerate`` built, and FSDP2 sharding on CPU processes.

``accelerate launch`` passes the engine of its config file to the processes through environment
variables (``ACCELERATE_USE_FSDP`` with ``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``; the process
count through torchrun's ``WORLD_SIZE``), and the ``Accelerator`` then picks its distributed type from
the hardware. Where the two disagree ``accelerate`` falls back without a word: on CPU processes
(``ACCELERATE_USE_CPU=true``) the FSDP and DeepSpeed sections are ignored and the model is wrapped in
DDP; without a GPU and without ``ACCELERATE_USE_CPU`` every process trains alone on all pairs.
:func:`build_accelerator` refuses every such mismatch with :class:`LaunchMismatchError`, before any
collection (``refuel.training.iterations.run`` builds it first).

One mismatch is honoured instead of refused: FSDP2 asked for on CPU processes. ``accelerate`` can
shard only on GPUs, so :func:`fully_shard_on_cpu` shards the policy itself with PyTorch's
``fully_shard`` (each decoder layer, then the root; gloo process group), the engine that
``configs/accelerate/fsdp.yaml`` asks ``accelerate`` for on GPUs. This is how the sharded REFUEL step is
tested on CPU (``tests/test_distributed.py``); :func:`full_state_dict` gathers its full weights on save.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from dialogsim.console import UsageError
from refuel.config import RefuelConfig

SHARDED_ENGINES = (DistributedType.DEEPSPEED, DistributedType.FSDP)


class LaunchMismatchError(UsageError, RuntimeError):
    """The ``Accelerator`` does not run the engine or process count that the launch asked for (a refused
    combination: commands exit 2)."""


@dataclass(frozen=True)
class RequestedLaunch:
    """What ``accelerate launch`` (or torchrun) asked of this process, read from its environment.

    Attributes:
        engine: ``"FSDP"``, ``"DEEPSPEED"`` or ``"DDP"`` (no sharded engine asked for; one process is DDP of 1).
        processes: ``WORLD_SIZE`` (1 when absent: a plain ``python`` run).
        fsdp_version: ``FSDP_VERSION`` (1 or 2) when ``engine`` is FSDP, else 0.
        cpu: ``ACCELERATE_USE_CPU`` is true (CPU processes, gloo backend).
    """

    engine: str
    processes: int
    fsdp_version: int
    cpu: bool

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> RequestedLaunch:
        """Read the variables that ``accelerate launch`` sets from its config file and flags."""

        def flag(name: str) -> bool:
            return environ.get(name, "false").strip().lower() in ("1", "true", "yes")

        engine = "DEEPSPEED" if flag("ACCELERATE_USE_DEEPSPEED") else "FSDP" if flag("ACCELERATE_USE_FSDP") else "DDP"
        return cls(
            engine=engine,
            processes=int(environ.get("WORLD_SIZE", "1")),
            fsdp_version=int(environ.get("FSDP_VERSION", "1")) if engine == "FSDP" else 0,
            cpu=flag("ACCELERATE_USE_CPU"),
        )

    def describe(self) -> str:
        """``"FSDP2 on 2 CPU processes"``-style summary for error messages."""
        engine = f"FSDP{self.fsdp_version}" if self.engine == "FSDP" else self.engine
        return f"{engine} on {self.processes} {'CPU ' if self.cpu else ''}process{'es' if self.processes > 1 else ''}"


def shards_on_cpu(accelerator: Accelerator, requested: RequestedLaunch | None = None) -> bool:
    """Whether this launch is FSDP2 on CPU processes, which :func:`fully_shard_on_cpu` shards itself."""
    requested = requested or RequestedLaunch.from_environment()
    return (
        requested.engine == "FSDP"
        and requested.fsdp_version == 2
        and accelerator.distributed_type == DistributedType.MULTI_CPU
    )


def check_launch(accelerator: Accelerator, config: RefuelConfig, requested: RequestedLaunch | None = None) -> None:
    """Refuse an ``Accelerator`` whose engine or process count differs from what the launch asked for.

    Args:
        accelerator: the built ``Accelerator``.
        config: the run config (LoRA is refused under sharded engines; resumable checkpoints under
            :func:`fully_shard_on_cpu`).
        requested: what the launch asked for (default: read from the environment).

    Raises:
        LaunchMismatchError: another process count or distributed type than asked for; the message
            names both, why ``accelerate`` chose it and how to launch instead.
        ValueError: LoRA (``lora_r > 0``) with FSDP or DeepSpeed: the adapters are merged into the full
            weights on save, which needs the whole model in one process; or ``checkpoint_every`` with
            FSDP2 on CPU processes (its training state is not saved).
    """
    requested = requested or RequestedLaunch.from_environment()
    obtained = f"{accelerator.distributed_type.value} on {accelerator.num_processes} process(es)"
    asked = f"the launch asked for {requested.describe()} but accelerate built {obtained}"
    on_cpu = requested.cpu or accelerator.device.type == "cpu"
    if accelerator.num_processes != requested.processes:
        if accelerator.distributed_type == DistributedType.DEEPSPEED and on_cpu:
            why = (
                "accelerate runs DeepSpeed only on GPUs: on CPU it starts DeepSpeed's process group but counts "
                "1 process and shards no data. Launch on GPUs, or on CPU with configs/accelerate/fsdp.yaml"
            )
        elif accelerator.distributed_type == DistributedType.NO and not torch.cuda.is_available():
            why = (
                "no GPU is visible and ACCELERATE_USE_CPU is not true, so accelerate did not join the processes "
                "into one process group: each would collect and train alone on all pairs. Launch on GPUs, or "
                "set ACCELERATE_USE_CPU=true for CPU processes (gloo backend)"
            )
        else:
            why = "accelerate did not join all launched processes into its process group; check the launch's rendezvous"
        raise LaunchMismatchError(f"{asked}: {why}.")
    sharded = accelerator.distributed_type in SHARDED_ENGINES or shards_on_cpu(accelerator, requested)
    if requested.engine == "FSDP" and not sharded:
        why = (
            f"on CPU processes accelerate runs DDP and ignores the FSDP section, and refuel shards CPU processes "
            f"only with FSDP2 (the config asks for FSDP{requested.fsdp_version}); set fsdp_version: 2"
            if on_cpu
            else "accelerate shards with FSDP only on a multi-GPU process group"
        )
        raise LaunchMismatchError(f"{asked}: {why}.")
    if requested.engine == "DEEPSPEED" and accelerator.distributed_type != DistributedType.DEEPSPEED:
        why = (
            "accelerate skips DeepSpeed on CPU processes (ACCELERATE_USE_CPU=true); on GPUs launch without it, "
            "on CPU launch with configs/accelerate/fsdp.yaml"
            if on_cpu
            else "accelerate did not start its DeepSpeed engine"
        )
        raise LaunchMismatchError(f"{asked}: {why}.")
    if config.lora_r and sharded:
        raise ValueError(
            f"LoRA (lora_r={config.lora_r}) is not supported with {requested.describe()}: the adapters are merged "
            "into the full weights on save, which needs the whole model in every process; launch with DDP "
            "(configs/accelerate/ddp.yaml) or set lora_r 0"
        )
    if config.checkpoint_every and shards_on_cpu(accelerator, requested):
        raise ValueError(
            "checkpoint_every > 0 is not supported with FSDP2 on CPU processes (a test path: its sharded "
            "training state is not saved); set checkpoint_every 0 or launch on GPUs"
        )


def build_accelerator(config: RefuelConfig) -> Accelerator:
    """The ``Accelerator`` of a REFUEL run, checked against the launch (:func:`check_launch`).

    Args:
        config: ``gradient_accumulation_steps`` and ``mixed_precision`` of the run.

    Raises:
        LaunchMismatchError: the launch asked for DeepSpeed and ``deepspeed`` is not installed, or the
            ``Accelerator`` runs another engine or process count than asked for.
        ValueError: see :func:`check_launch`.
    """
    requested = RequestedLaunch.from_environment()
    if requested.engine == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise LaunchMismatchError(
            f"the launch asked for {requested.describe()} but deepspeed is not installed: pip install deepspeed "
            "on the GPU machine, or launch with configs/accelerate/fsdp.yaml (FSDP2 needs no extra package)"
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=config.mixed_precision
    )
    check_launch(accelerator, config, requested)
    return accelerator


def fully_shard_on_cpu(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 over the CPU processes when the launch asks for FSDP2 on CPU; else return it.

    Each module whose class is named in ``FSDP_TRANSFORMER_CLS_TO_WRAP`` (the accelerate config's
    ``fsdp_transformer_layer_cls_to_wrap``; default the model's ``_no_split_modules``, the decoder
    layer) becomes one FSDP unit, the rest (embeddings, final norm, tied LM head) the root unit; the
    parameters become DTensors sharded on dim 0 over a 1-D gloo mesh of all processes. The model is then
    registered with ``accelerator`` as prepared, so ``Accelerator.prepare`` does not wrap it in DDP.
    Build the optimizer from the returned model's parameters.

    Args:
        model: π_t, a plain causal LM in fp32 on CPU (called before ``Accelerator.prepare``).
        accelerator: from :func:`build_accelerator`.

    Raises:
        ValueError: no module of the configured class is found (the message names the classes).
    """
    if not shards_on_cpu(accelerator):
        return model
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or ",".join(getattr(model, "_no_split_modules", None) or [])
    classes = {name.strip() for name in names.split(",") if name.strip()}
    layers = [module for module in model.modules() if type(module).__name__ in classes]
    if not layers:
        raise ValueError(
            f"FSDP2 on CPU: no module of class {sorted(classes)} in {type(model).__name__}; set "
            "fsdp_transformer_layer_cls_to_wrap in the accelerate config to the model's decoder layer class"
        )
    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return accelerator.prepare_model(model, evaluation_mode=True)  # marked prepared: no DDP wrapper


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) weights of a sharded ``model`` for saving, or None when it is not sharded.

    Collective: every process must call it. FSDP and DeepSpeed through ``accelerate`` use
    ``Accelerator.get_state_dict`` (ZeRO-3: 16-bit weights); FSDP2 on CPU gathers the fp32 DTensors with
    ``torch.distributed.checkpoint``'s full state dict, on CPU.
    """
    if accelerator.distributed_type in SHARDED_ENGINES:
        return accelerator.get_state_dict(model)
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None
