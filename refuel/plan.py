"""Dry run of ``refuel-train``: check a run configuration and print its plan, without loading a model.

    python -m refuel.plan --config configs/gpu_setting_one.yaml --accelerate_config configs/accelerate/fsdp.yaml

Every ``refuel-train`` flag is accepted (flags override the ``--config`` file), plus:

- ``--accelerate_config FILE``: the file given to ``accelerate launch --config_file``; its process
  count, engine (DDP, DeepSpeed, FSDP) and mixed precision are checked against the run config.
- ``--num_processes N``: overrides the file's process count, as ``accelerate launch`` does.

What is checked: every field's type and range and the combinations of :data:`refuel.config.RULES` (the check
``refuel-train`` runs when it parses its config; each is declared once, on the field or in that table),
``--output_dir`` (a new folder, or a run whose recorded stage settings agree: :mod:`refuel.run_folder`), the
combinations that depend on the launch (LoRA only where adapters can be merged, precision
and clipping agreeing with the engine, vLLM tensor parallelism within the GPUs),
per-device batch × accumulation × processes = ``effective_batch_size``, and that every model name
is an embedded model, an existing folder or a well-formed hub id, and that a reward of the user's code
(``--reward package.module:name``) loads and scores the tasks. Hub ids are checked for form only (with
``HF_HUB_OFFLINE=1``, one absent from the local cache is a warning): nothing is downloaded, no model is loaded and
the network is not used.

Exit status (:mod:`dialogsim.console`): 0 when the configuration is valid (warnings allowed), 2 when a check
fails (the plan on stdout with its ``error:`` lines, and one ``error:`` line on stderr), 1 when the dry run
itself fails.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialogsim.console import UsageError, console_command
from refuel.cli import parse_config
from refuel.config import RefuelConfig
from refuel.run_folder import RunFolder, RunFolderError
from refuel.training.batching import effective_batch_mismatch, step_schedule, validation_count

SHARDED_TYPES = ("DEEPSPEED", "FSDP")
REMOTE_CODE_REWARDS = ("armorm",)  # reward models whose hub code must run (trust_remote_code)


@dataclass
class Launch:
    """How ``accelerate launch`` will run the trainer.

    Attributes:
        processes: world size P (one process per GPU).
        distributed_type: accelerate's name (``NO``, ``MULTI_GPU``, ``DEEPSPEED``, ``FSDP``, …).
        engine: readable engine, e.g. ``"DeepSpeed ZeRO-3"``.
        mixed_precision: the accelerate config's precision, or None without a config file.
        gpus: whether the launch uses GPUs (False for a plain single process or ``use_cpu``).
    """

    processes: int = 1
    distributed_type: str = "NO"
    engine: str = "single process"
    mixed_precision: str | None = None
    gpus: bool = False
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """The dry run's result: the plan's lines, warnings and errors (each a full sentence with the fix)."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        text = ["REFUEL plan (dry run: no model loaded, nothing downloaded)", *(f"  {line}" for line in self.lines)]
        text += [f"warning: {message}" for message in self.warnings]
        text += [f"error: {message}" for message in self.errors]
        verdict = "OK: the configuration is valid" if self.ok else f"FAILED: {len(self.errors)} error(s)"
        return "\n".join([*text, f"{verdict} ({len(self.warnings)} warning(s))"])


def read_launch(path: Path | None, num_processes: int | None, plan: Plan) -> Launch:
    """Read an accelerate config file with accelerate's own loader and check its engine settings.

    Problems go to ``plan.errors``; a missing file is an error too.
    """
    launch = Launch()
    if path is not None:
        from accelerate.commands.config.config_args import load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        try:
            settings = load_config_from_file(str(path))
        except (OSError, ValueError, TypeError) as error:
            plan.errors.append(f"--accelerate_config {path}: {error}")
            return launch
        kind = getattr(settings.distributed_type, "value", str(settings.distributed_type))
        launch.distributed_type = kind
        launch.processes = int(settings.num_processes or 1)
        launch.mixed_precision = settings.mixed_precision
        launch.gpus = not settings.use_cpu and kind != "NO"
        launch.settings = {"deepspeed": dict(settings.deepspeed_config or {}), "fsdp": dict(settings.fsdp_config or {})}
        launch_flags = {action.dest for action in launch_command_parser()._actions}
        for section, prefix in (("deepspeed", ""), ("fsdp", "fsdp_")):
            for key in launch.settings[section]:
                flag = key if key.startswith(prefix) else prefix + key
                if flag not in launch_flags:
                    plan.errors.append(
                        f"--accelerate_config {path}: {section}_config key {key!r} is not an accelerate launch "
                        "setting; see `accelerate launch --help`"
                    )
        launch.engine = {"NO": "single process", "MULTI_GPU": "DDP", "MULTI_CPU": "DDP (CPU, gloo)"}.get(kind, kind)
        if kind == "DEEPSPEED":
            launch.engine = f"DeepSpeed ZeRO-{launch.settings['deepspeed'].get('zero_stage', '?')}"
        elif kind == "FSDP":
            launch.engine = f"FSDP{launch.settings['fsdp'].get('fsdp_version', 1)}"
    if num_processes is not None:
        if num_processes < 1:
            plan.errors.append(f"--num_processes must be >= 1, got {num_processes}")
        launch.processes = num_processes
    return launch


def describe_model(field_name: str, value: str, plan: Plan) -> str:
    """What kind of model name ``value`` is (:data:`~dialogsim.models.MODEL_KINDS`); an invalid name
    (:func:`~dialogsim.models.check_model_name`) is recorded in ``plan.errors``.

    Offline, a hub id absent from the local cache is a warning, not an error: ``refuel-train`` would refuse it on
    this machine, but a dry run may check a recipe for another one (the GPU recipe on a CPU machine).
    """
    from dialogsim.models import MODEL_KINDS, ModelNotCachedError, check_model_name

    try:
        return MODEL_KINDS[check_model_name(field_name, value)]
    except ModelNotCachedError as error:
        plan.warnings.append(f"{error}; refuel-train refuses it on this machine (fine for a recipe run elsewhere)")
        return "hub id, not in the local cache"
    except UsageError as error:
        plan.errors.append(str(error))
        return "invalid"


def make_plan(
    config: RefuelConfig,
    accelerate_config: Path | None = None,
    num_processes: int | None = None,
    config_file: Path | None = None,
) -> Plan:
    """Check ``config`` for a launch on ``accelerate_config`` and describe what the run will do.

    Args:
        config: the parsed run configuration (field-level checks of ``RefuelConfig`` already passed).
        accelerate_config: the accelerate config file of the launch, if any (else one process).
        num_processes: overrides the accelerate config's process count.
        config_file: the run config file, for the printed launch command.

    Returns:
        A :class:`Plan`; ``plan.ok`` is False when a check failed.
    """
    from dialogsim.models import ModelNotCachedError
    from dialogsim.precision import backend_precision
    from dialogsim.rewards.factory import BUILTIN_SPECS, check_reward_scores
    from dialogsim.user import REPLAY

    plan = Plan()
    launch = read_launch(accelerate_config, num_processes, plan)
    processes = launch.processes

    # models and data
    policy_kind = describe_model("policy_model", config.policy_model, plan)
    if config.user_template == REPLAY:
        user_kind = "not loaded: each row's scripted follow-ups are replayed (meta.follow_ups)"
    elif config.user_backend == "openai":
        user_kind = f"served by the OpenAI-compatible server at {config.user_base_url}"
    else:
        user_kind = describe_model("user_model", config.user_model, plan)
    if config.reward.strip().lower() in BUILTIN_SPECS:
        reward_kind = "built-in reward"
    elif _is_reward_plugin(config.reward):
        reward_kind = "your own reward (plugin)"
    else:
        reward_kind = "sequence-classification reward model, " + describe_model("reward", config.reward, plan)
        if any(name in config.reward.lower() for name in REMOTE_CODE_REWARDS) and not config.trust_remote_code:
            plan.errors.append(
                f"reward {config.reward} runs its own hub code and needs trust_remote_code; set trust_remote_code: true"
            )
    try:
        check_reward_scores(config.reward, config.tasks)
    except ModelNotCachedError:
        pass  # a reward model absent from the cache: describe_model's warning
    except UsageError as error:
        plan.errors.append(str(error))
    if config.prompts is None:
        from dialogsim.data import PromptsNotFoundError, default_prompt_source

        try:
            prompts = f"{default_prompt_source()} (default)"
        except PromptsNotFoundError as error:
            prompts = "(none)"
            plan.errors.append(str(error))
    elif Path(config.prompts).expanduser().exists():
        prompts = f"{config.prompts} (file)"
    elif "/" in config.prompts and not config.prompts.startswith((".", "/", "~")):
        prompts = f"{config.prompts} (hub dataset, checked for form only)"
    else:
        prompts = config.prompts
        plan.errors.append(f"prompts={config.prompts!r}: no such file, and not an org/name hub dataset id")

    # combinations
    if launch.mixed_precision is not None and launch.mixed_precision != config.mixed_precision:
        plan.errors.append(
            f"the accelerate config's mixed_precision is {launch.mixed_precision!r}, the run config's "
            f"{config.mixed_precision!r}; the trainer uses the run config's (DeepSpeed its own): make them equal"
        )
    sharded = launch.distributed_type in SHARDED_TYPES
    if config.lora_r and sharded:
        plan.errors.append(
            f"lora_r={config.lora_r} with {launch.engine}: LoRA adapters are merged into full weights on save, "
            "which needs whole (unsharded) weights; use configs/accelerate/ddp.yaml or set lora_r 0"
        )
    deepspeed = launch.settings.get("deepspeed", {})
    if launch.distributed_type == "DEEPSPEED":
        if "gradient_accumulation_steps" in deepspeed and deepspeed["gradient_accumulation_steps"] not in (
            "auto",
            config.gradient_accumulation_steps,
        ):
            plan.errors.append(
                f"deepspeed_config.gradient_accumulation_steps={deepspeed['gradient_accumulation_steps']} differs "
                f"from the run config's {config.gradient_accumulation_steps}; remove it from the accelerate config"
            )
        clipping = deepspeed.get("gradient_clipping", 1.0)
        if clipping not in ("auto",) and float(clipping) != config.max_grad_norm:
            plan.errors.append(
                f"deepspeed_config.gradient_clipping={clipping} differs from max_grad_norm={config.max_grad_norm} "
                "(DeepSpeed clips by its own setting); make them equal"
            )
        if int(deepspeed.get("zero_stage", 0)) == 3 and not deepspeed.get("zero3_save_16bit_model", False):
            plan.errors.append("ZeRO-3 needs zero3_save_16bit_model: true in deepspeed_config to save π_{t+1}")
        plan.warnings.append(
            "DeepSpeed saves π_{t+1} from bf16 weights; FSDP (configs/accelerate/fsdp.yaml) keeps fp32"
        )
    if launch.gpus and config.mixed_precision == "no":
        plan.warnings.append("mixed_precision 'no' on GPUs: fp32 compute is slow and memory-hungry; use bf16")
    for kind, engine in (("policy", config.backend), ("user", config.user_backend)):
        if engine == "vllm" and launch.gpus and config.vllm_tensor_parallel_size > processes:
            plan.errors.append(
                f"vllm_tensor_parallel_size={config.vllm_tensor_parallel_size} for the {kind} engine exceeds the "
                f"{processes} GPUs of the launch"
            )

    # batch and steps
    effective = config.per_device_batch_size * config.gradient_accumulation_steps * processes
    if config.effective_batch_size is None:
        plan.warnings.append("effective_batch_size is unset: the launch's process count is not checked at start")
    elif mismatch := effective_batch_mismatch(config, processes):
        plan.errors.append(mismatch)
    pairs = config.pairs_per_iteration
    validation_pairs = validation_count(pairs, config.validation_fraction)
    train_pairs = pairs - validation_pairs
    schedule = step_schedule(
        math.ceil(train_pairs / config.per_device_batch_size),  # as plan_micro_batches cuts them
        processes,
        config.gradient_accumulation_steps,
        config.epochs,
        config.warmup_ratio,
    )
    steps, warmup = schedule.steps, schedule.warmup
    if train_pairs < effective:
        plan.warnings.append(f"at most {train_pairs} training pairs per iteration: less than one step of {effective}")
    if validation_pairs == 0:
        plan.warnings.append("no validation pairs: validation_fraction × pairs_per_iteration rounds to 0")
    step_checkpoints = (steps - 1) // config.checkpoint_every if config.checkpoint_every else 0
    if step_checkpoints == 0 and not config.checkpoint_minutes:
        plan.warnings.append(
            f"no training checkpoint will be written (≤ {steps} steps, checkpoint_every {config.checkpoint_every}, "
            "checkpoint_minutes 0): a kill during training loses it; set checkpoint_minutes or checkpoint_every"
        )
    try:
        RunFolder(Path(config.output_dir)).check(config)
    except RunFolderError as error:
        plan.errors.append(str(error))

    # the plan
    run_config = str(config_file) if config_file else "<run config>"
    if processes > 1 or accelerate_config is not None:
        command = (
            f"accelerate launch --config_file {accelerate_config} -m refuel.training.iterations --config {run_config}"
        )
    else:
        command = f"refuel-train --config {run_config}"
    memory = [
        f"{config.mixed_precision} mixed precision" if config.mixed_precision != "no" else "fp32",
        "gradient checkpointing" if config.gradient_checkpointing else "no gradient checkpointing",
        f"LoRA r={config.lora_r} α={config.lora_alpha} on {' '.join(config.lora_target_modules)}, merged on save"
        if config.lora_r
        else "full fine-tuning",
    ]
    user_engine = config.user_backend + (
        f" (tensor parallel {config.vllm_tensor_parallel_size})" if config.user_backend == "vllm" else ""
    )
    policy_engine = config.backend + (
        f" (tensor parallel {config.vllm_tensor_parallel_size})" if config.backend == "vllm" else ""
    )
    objective = {
        "refuel": f"REFUEL regression, η = {config.eta:g}",
        "rebel_lt": f"REBEL-LT regression on last-turn pairs rolled in with π_0, η = {config.eta:g}",
        "dpo_lt": f"DPO-LT on last-turn pairs rolled in with π_0, β = {getattr(config, 'dpo_beta', float('nan')):g}",
    }.get(getattr(config, "method", "refuel"), str(getattr(config, "method", "refuel")))
    tasks = "all" if config.tasks is None else ", ".join(config.tasks)
    datasets = "all" if config.datasets is None else ", ".join(config.datasets)
    precision = backend_precision(config.engine_dtype, config.backend)
    plan.lines += [
        f"launch         {command}",
        f"processes      {processes} ({launch.engine}, accelerate mixed precision {launch.mixed_precision or 'unset'})",
        f"policy π_0     {config.policy_model} [{policy_kind}]; roll-outs on {policy_engine}",
        f"user           {config.user_model} [{user_kind}] on {user_engine}, template {config.user_template!r}",
        f"reward         {config.reward} [{reward_kind}]",
        f"precision      engines {precision.dtype} ({precision.reason}) on {precision.hardware}; training float32",
        f"prompts        {prompts}; tasks {tasks}; datasets {datasets}; {config.holdout} held out for evaluation",
        f"iterations     {config.iterations}: " + " → ".join(f"π_{t}" for t in range(config.iterations + 1)),
        f"per iteration  {pairs} reset points → ≤ {train_pairs} training + {validation_pairs} validation pairs "
        "(after drops)",
        f"episodes       H ~ U{{1..{config.max_horizon}}}, h ~ U{{1..H}}; temperature {config.temperature}, top-p "
        f"{config.top_p}, ≤ {config.max_new_tokens} new tokens per reply, ≤ {config.max_dialogue_tokens} per dialogue",
        f"batch          {config.per_device_batch_size} pairs/device × {config.gradient_accumulation_steps} "
        f"accumulation × {processes} processes = {effective} pairs per optimizer step "
        f"({2 * config.per_device_batch_size} sequences per forward)",
        f"steps          ≤ {steps} per iteration ({config.epochs} epoch(s), warm-up {warmup}, cosine to 0); "
        f"≤ {steps * config.iterations} in all",
        f"optimizer      AdamW lr {config.learning_rate:g}, β ({config.adam_beta1}, {config.adam_beta2}), "
        f"weight decay {config.weight_decay:g}, gradient clipping {config.max_grad_norm}",
        f"objective      {objective}; π_t log-probs once per iteration before the steps (no reference model)",
        f"memory         {', '.join(memory)}",
        f"checkpoints    {step_checkpoints} per iteration by steps (every {config.checkpoint_every or 'never'}), "
        + (
            f"plus one after any step ending ≥ {config.checkpoint_minutes:g} min after the last"
            if config.checkpoint_minutes
            else "none by time"
        )
        + "; none after the last step",
        f"output         {config.output_dir}/iteration_<t>/policy (π_(t+1), a plain save_pretrained folder)",
    ]
    return plan


def _is_reward_plugin(spec: str) -> bool:
    """Whether ``spec`` names a reward plugin (:func:`~dialogsim.plugins.find_plugin`), also one that cannot be
    loaded (``check_reward_scores`` reports it)."""
    from dialogsim.plugins import REWARD_GROUP, find_plugin
    from dialogsim.rewards.factory import REWARD_FLAG

    try:
        return find_plugin(spec.strip(), REWARD_GROUP, REWARD_FLAG) is not None
    except UsageError:
        return True


@console_command
def main(argv: list[str]) -> int:
    """Entry point of ``refuel-plan`` / ``python -m refuel.plan``; exits 0 when the configuration is valid, 2 when
    it is not (:mod:`dialogsim.console`)."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--accelerate_config", "--accelerate-config", type=Path)
    extra.add_argument("--num_processes", "--num-processes", type=int)
    known, rest = extra.parse_known_args(argv)
    config_file = argparse.ArgumentParser(add_help=False)
    config_file.add_argument("--config", type=Path)
    config_path = config_file.parse_known_args(rest)[0].config
    config = parse_config(RefuelConfig, rest, description=__doc__)
    plan = make_plan(config, known.accelerate_config, known.num_processes, config_path)
    print(plan.render())
    if not plan.ok:
        raise UsageError(f"the configuration does not validate: {'; '.join(plan.errors)}")
    return 0


if __name__ == "__main__":
    main()
