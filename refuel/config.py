"""Configuration of every command, composed from one small dataclass per concept.

Each concept's fields (name, type, default, help line) are written once and shared by every command that
has them, as TRL's scripts compose their argument classes:

==========================  ===================================================================================
group                       fields
==========================  ===================================================================================
:class:`~envs.config.PromptConfig`, :class:`~envs.config.UserConfig`, :class:`~envs.config.RewardConfig`
                            the simulator (:class:`~envs.config.SimulatorConfig`, taken by ``build_simulator``)
:class:`EngineConfig`       the policy's engine (``backend``)
:class:`UserEngineConfig`   the simulated user's engine
:class:`VLLMConfig`         vLLM's memory
:class:`SamplingConfig`     the policy's sampling (``max_new_tokens``, ``temperature``, ``top_p``)
:class:`SeedConfig`         the seed
:class:`DialogueConfig`     the groups above, which every command has
:class:`CollectionConfig`   REFUEL pairs: π_0, pairs per iteration, H, method, where pairs start
:class:`TrainingConfig`     the loss, the optimizer, batching, precision, LoRA
:class:`RunConfig`          the run folder, iterations, checkpoints, scale-out
:class:`EvaluationConfig`   the evaluation dialogues (baseline, prompts, H)
:class:`JudgeConfig`        the pairwise judge
:class:`CandidatesConfig`   the candidates and the output folder of an evaluation
==========================  ===================================================================================

``refuel-train`` and ``refuel-plan`` take :class:`RefuelConfig`, ``refuel-evaluate`` takes :class:`EvaluateConfig`;
their command lines are generated from them (:func:`refuel.cli.parse_config`). What a run stage's fingerprint
(:mod:`refuel.run_folder`) and an evaluation's dialogue cache key cover is a union of groups
(:data:`COLLECTION_GROUPS`, :data:`TRAINING_GROUPS`, :data:`GENERATION_GROUPS`), so a new field enters them by
the group it is declared in. Every value is checked when a config is built (:func:`refuel.settings_check.check_config`),
before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from dialogsim.models import DEFAULT_MODEL
from dialogsim.precision import EngineDtype
from dialogsim.sampling import SamplingParams
from envs.config import PromptConfig, SimulatorConfig, UserConfig, field_names, help_line
from refuel.settings_check import NON_NEGATIVE, check_config

Method = Literal["refuel", "rebel_lt", "dpo_lt"]
Rollin = Literal["current", "initial", "dataset"]
Stage = Literal["collection", "training"]
PolicyBackend = Literal["transformers", "vllm"]
UserBackend = Literal["auto", "transformers", "vllm", "openai"]
METHODS: tuple[str, ...] = get_args(Method)
STAGES: tuple[str, ...] = get_args(Stage)


@dataclass
class EngineConfig:
    """The engine that generates the policy's replies (and loads π_t's weights live), and the precision of
    every model the command runs for inference (:func:`dialogsim.precision.engine_dtype`)."""

    backend: PolicyBackend = field(
        default="transformers",
        metadata=help_line(
            "policy engine: transformers | vllm (one engine; π_t's or a later policy's weights are loaded into it)"
        ),
    )
    engine_dtype: EngineDtype = field(
        default="auto",
        metadata=help_line(
            "precision of every inference engine (policy, user, judge, reward models): auto (bf16 where the "
            "processor has bf16 instructions or CUDA bf16, else float32) | float32 | bfloat16 | float16; "
            "training stays float32"
        ),
    )


@dataclass
class UserEngineConfig:
    """The engine of the simulated user."""

    user_backend: UserBackend = field(
        default="auto",
        metadata=help_line(
            "simulated-user engine: auto (the policy's; on vllm the user shares the policy's engine when its model "
            "has the policy's architecture, weights swapped per call) | transformers | vllm (an engine of its own) "
            "| openai (a server)"
        ),
    )
    user_base_url: str | None = field(
        default=None, metadata=help_line("OpenAI-compatible server of the user model (user_backend=openai)")
    )


@dataclass
class VLLMConfig:
    """vLLM's memory per engine (no effect on what is generated)."""

    vllm_kv_cache_gib: float = field(default=4.0, metadata=help_line("vLLM KV-cache space per engine on CPU (GiB)"))


@dataclass
class SamplingConfig:
    """How the policy samples its replies; REFUEL's log-probs are taken at the same temperature."""

    max_new_tokens: int = field(default=160, metadata=help_line("cap on policy reply tokens (paper: 1024)"))
    temperature: float = field(default=0.8, metadata=help_line("policy sampling temperature (paper: 0.8)"))
    top_p: float = field(default=1.0, metadata=help_line("policy nucleus sampling mass"))

    def sampling_params(self, seed: int | None = None) -> SamplingParams:
        """These settings as the engines' :class:`~dialogsim.sampling.SamplingParams`."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=seed
        )


@dataclass
class SeedConfig:
    """The seed of everything drawn: prompts, H and h, sampling, data order, initialisation."""

    seed: int = field(default=0, metadata=help_line("seed of prompt choice, collection, sampling and data order"))


@dataclass
class CollectionConfig:
    """What REFUEL pairs are collected from: π_0, how many, the horizon, the method and where pairs start."""

    policy_model: str = field(default=DEFAULT_MODEL, metadata=help_line("π_0: model name, folder or hub id"))
    pairs_per_iteration: int = field(default=32, metadata=help_line("reset points tried per iteration"))
    max_horizon: int = field(default=3, metadata=help_line("H is drawn uniformly from 1..max_horizon (paper: 5)"))
    generation_batch_size: int = field(default=32, metadata=help_line("pairs advanced together in collection"))
    method: Method = field(
        default="refuel",
        metadata=help_line(
            "refuel (roll in with π_t, h ~ U{1..H}) | rebel_lt / dpo_lt (paper's last-turn baselines: "
            "roll in with π_ref = the initial policy, reset at h = H, REBEL regression / DPO loss)"
        ),
    )
    rollin: Rollin = field(
        default="current",
        metadata=help_line(
            "where REFUEL pairs start: current (roll in with π_t) | initial (roll in with π_ref, the initial "
            "policy; PPO++ idea) | dataset (prefixes of offline dialogues; DR-PO idea)"
        ),
    )
    rollin_beta: float = field(
        default=0.0, metadata=help_line("β: share of pairs starting at the prompt (h = 1) with --rollin initial")
    )
    dataset_weight: float = field(
        default=0.5, metadata=help_line("w: share of pairs reset to an offline-dialogue prefix with --rollin dataset")
    )
    offline_dialogues: str | None = field(
        default=None,
        metadata=help_line("offline dialogues for --rollin dataset: .jsonl/.parquet with 'messages', or a hub id"),
    )
    offline_limit: int | None = field(
        default=None, metadata=help_line("keep at most this many offline dialogues (seeded shuffle)")
    )


@dataclass
class TrainingConfig:
    """The regression π_t → π_{t+1}: loss, optimizer, batching, precision, LoRA."""

    eta: float = field(default=10.0, metadata=help_line("η in the REFUEL loss (paper: 1e3 with raw ArmoRM scores)"))
    dpo_beta: float = field(default=0.1, metadata=help_line("β of the DPO loss (method dpo_lt)"))
    learning_rate: float = field(default=1e-6, metadata=help_line("AdamW learning rate (paper: 3e-7 for 8B)"))
    adam_beta1: float = field(default=0.9, metadata=help_line("AdamW β1"))
    adam_beta2: float = field(default=0.95, metadata=help_line("AdamW β2"))
    weight_decay: float = field(default=1e-6, metadata=help_line("AdamW weight decay"))
    warmup_ratio: float = field(default=0.1, metadata=help_line("fraction of steps of linear warm-up before cosine"))
    epochs: int = field(default=1, metadata=help_line("passes over an iteration's pairs"))
    per_device_batch_size: int = field(default=4, metadata=help_line("pairs per micro-batch"))
    gradient_accumulation_steps: int = field(default=2, metadata=help_line("micro-batches per optimizer step"))
    max_grad_norm: float = field(default=1.0, metadata=help_line("gradient clipping norm"))
    validation_fraction: float = field(default=0.2, metadata=help_line("share of pairs held out for validation"))
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no",
        metadata=help_line("accelerate mixed precision: no | bf16 | fp16 (bf16 diverged on CPU at lr 1e-6: README)"),
    )
    pair_layout: Literal["shared_prefix", "separate"] = field(
        default="shared_prefix",
        metadata=help_line(
            "how a pair's log-probs are computed: shared_prefix (s_h once, y and y' after it under a block "
            "mask, logits at reply positions only) | separate (two padded sequences, logits everywhere)"
        ),
    )
    length_buckets: bool = field(
        default=True, metadata=help_line("put pairs of similar length in one micro-batch (less padding)")
    )
    lora_r: int = field(default=0, metadata=help_line("LoRA rank (needs peft); 0 = full fine-tuning. Merged on save"))
    lora_alpha: int = field(default=32, metadata=help_line("LoRA α; the adapter update is scaled by α / lora_r"))
    lora_dropout: float = field(default=0.0, metadata=help_line("LoRA dropout; 0 keeps the loss at π = π_t exact"))
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata=help_line("LoRA modules: all-linear, or names like q_proj v_proj"),
    )


@dataclass
class RunConfig:
    """The run folder, how many iterations, checkpoints and scale-out: nothing a stage's result depends on."""

    output_dir: str = field(default="runs/refuel", metadata=help_line("run directory (pairs, checkpoints, metrics)"))
    iterations: int = field(default=1, metadata=help_line("REFUEL iterations t = 0..T-1 (paper: 2)"))
    checkpoint_every: int = field(
        default=10, metadata=help_line("optimizer steps between resumable training checkpoints (0: none)")
    )
    checkpoint_minutes: float = field(
        default=2.0,
        metadata=help_line(
            "also checkpoint once this many minutes of training passed since the last checkpoint (0: never); "
            "a checkpoint of SmolLM2-135M is ~1.6 GB (fp32 weights + AdamW's two moments)"
        ),
    )
    restart_stage: Stage | None = field(
        default=None,
        metadata=help_line(
            "collection | training: start that stage over in a run folder whose recorded settings differ "
            "(the stage's files and every later iteration are removed); unset: a differing rerun is refused"
        ),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=help_line("recompute activations in the backward pass: less memory, ~30 % more time")
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata=help_line(
            "pairs per optimizer step, checked = per_device × accumulation × processes; unset: no check"
        ),
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata=help_line("vLLM tensor-parallel GPUs per engine"))


@dataclass
class DialogueConfig(
    SeedConfig,
    SamplingConfig,
    VLLMConfig,
    UserEngineConfig,
    EngineConfig,
    SimulatorConfig,
):
    """The groups every command has: simulator, engines, sampling, seed (how its dialogues are generated)."""


@dataclass
class RefuelConfig(RunConfig, TrainingConfig, CollectionConfig, DialogueConfig):
    """Everything a REFUEL run needs; the command lines of ``refuel-train`` and ``refuel-plan`` are generated from it.

    Defaults are the CPU main job (SmolLM2-135M-Instruct, shared Math_CoT prompts). The paper's GPU values
    (Llama-3-8B-it) are noted in the help lines.

    Raises:
        ValueError: a field of the wrong type, out of range, or in a combination that does not run
            (:func:`refuel.settings_check.check_config`), naming each one and what is valid.
    """

    def __post_init__(self) -> None:
        check_config(self)


@dataclass
class EvaluationConfig:
    """The evaluation dialogues: the baseline policy, which held-out prompts, the horizon."""

    baseline: str = field(default=DEFAULT_MODEL, metadata=help_line("baseline policy (π_0)"))
    n_prompts: int = field(default=16, metadata=help_line("held-out prompts evaluated (dialogues per policy)"))
    all_rows: bool = field(
        default=False,
        metadata=help_line(
            "evaluate every row of --prompts that passes the filters (--tasks/--datasets/--splits, where "
            "'all' keeps every value, and --max_prompt_tokens) instead of --n_prompts of the --holdout rows"
        ),
    )
    horizon: int = field(default=3, metadata=help_line("H: turns per evaluation dialogue (paper: 5)"))


@dataclass
class JudgeConfig:
    """The pairwise judge of two dialogues truncated at turn h (:func:`dialogsim.judges.build_judge`)."""

    judge: str = field(
        default="reward",
        metadata=help_line(
            "reward (--reward scores each truncated dialogue; ties ½) | llm (pairwise chat judge) | "
            "package.module:name or an installed plugin's name: a judge of your own (README 'Your own reward')"
        ),
    )
    judge_backend: Literal["transformers", "vllm", "openai"] = field(
        default="transformers", metadata=help_line("LLM judge engine: transformers | vllm | openai")
    )
    judge_model: str = field(
        default=DEFAULT_MODEL, metadata=help_line("LLM judge model (for openai: the server's model name)")
    )
    judge_base_url: str | None = field(
        default=None, metadata=help_line("OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1")
    )
    judge_max_new_tokens: int = field(default=192, metadata=help_line("cap on LLM judge reply tokens"))
    judge_template: Literal["compare", "letter"] = field(
        default="compare",
        metadata=help_line("LLM judge prompt: compare (comparison, then A/B) | letter (A/B only; small models)"),
    )


@dataclass
class CandidatesConfig:
    """The policies judged against the baseline and where their dialogues and reports go."""

    candidates: list[str] = field(
        default_factory=lambda: ["runs/refuel/iteration_0/policy"], metadata=help_line("candidate policies")
    )
    output_dir: str = field(default="runs/refuel/eval", metadata=help_line("where dialogues and reports go"))


@dataclass
class EvaluateConfig(CandidatesConfig, JudgeConfig, EvaluationConfig, DialogueConfig):
    """Settings of a per-turn win-rate evaluation; the ``refuel-evaluate`` flags are generated from it.

    Raises:
        ValueError: as :class:`RefuelConfig`; ``temperature`` 0 is valid here (greedy replies), not in training,
            whose log-probs are taken at the temperature.
    """

    def __post_init__(self) -> None:
        check_config(self, {"temperature": NON_NEGATIVE})


# What each stage of a run depends on (refuel.run_folder) and what shapes an evaluation's dialogues (its cache key).
COLLECTION_GROUPS = (SimulatorConfig, SamplingConfig, SeedConfig, CollectionConfig, EngineConfig)
TRAINING_GROUPS = (*COLLECTION_GROUPS, TrainingConfig)
GENERATION_GROUPS = (
    PromptConfig,
    UserConfig,
    EngineConfig,
    UserEngineConfig,
    VLLMConfig,
    SamplingConfig,
    SeedConfig,
    EvaluationConfig,
)
COLLECTION_FIELDS = field_names(*COLLECTION_GROUPS)
TRAINING_FIELDS = field_names(*TRAINING_GROUPS)
GENERATION_FIELDS = field_names(*GENERATION_GROUPS)
