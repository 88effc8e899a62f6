"""Configuration of every command, composed from one small dataclass per concept.

Each setting's default, range, help line and fingerprint membership are declared once, on its field
(:func:`dialogsim.settings.setting`; a field that means the same thing in another class is taken over with
:func:`~dialogsim.settings.same_as`), and every command that has the concept shares the class, as TRL's scripts
compose their argument classes:

==========================  ===================================================================================
group                       fields
==========================  ===================================================================================
:class:`~envs.config.SimulatorConfig`
                            prompts, simulated user, reward, engines (policy backend and precision, the user's
                            engine, vLLM's resources): what ``build_simulator`` (and ``gym.make``) takes
:class:`SamplingConfig`     the policy's sampling (``max_new_tokens``, ``temperature``, ``top_p``)
:class:`SeedConfig`         the seed
:class:`DialogueConfig`     the groups above, which every command has
:class:`CollectionConfig`   REFUEL pairs: π_0, pairs per iteration, H, method, where pairs start
:class:`TrainingConfig`     the loss, the optimizer, batching, precision, memory, LoRA
:class:`RunConfig`          the run folder, iterations, checkpoints
:class:`EvaluationConfig`   the evaluation dialogues (baseline, prompts, H)
:class:`JudgeConfig`        the pairwise judge
:class:`CandidatesConfig`   the candidates and the output folder of an evaluation
==========================  ===================================================================================

``refuel-train`` and ``refuel-plan`` take :class:`RefuelConfig`, ``refuel-evaluate`` takes :class:`EvaluateConfig`;
their command lines are generated from them (:func:`refuel.cli.parse_config`). What a run stage's fingerprint
(:mod:`refuel.run_folder`) and an evaluation's dialogue cache key cover is read off each field's ``shapes``
(:data:`COLLECTION_FIELDS`, :data:`TRAINING_FIELDS`, :data:`GENERATION_FIELDS`), so a new field declares its
membership where it is declared. Every value is checked when a config is built (its ``__post_init__``: each
field's type and range, then the combinations of :data:`RULES`), before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from dialogsim.models import DEFAULT_MODEL
from dialogsim.sampling import SamplingParams
from dialogsim.settings import (
    AT_LEAST_ONE,
    FRACTION,
    HORIZON,
    NON_NEGATIVE,
    POSITIVE,
    SHAPES,
    SHARE,
    Range,
    Rule,
    field_names,
    same_as,
    setting,
)
from dialogsim.simulator import EpisodeConfig
from envs.config import SIMULATOR_RULES, SimulatorConfig

Method = Literal["refuel", "rebel_lt", "dpo_lt"]
Rollin = Literal["current", "initial", "dataset"]
Stage = Literal["collection", "training"]
METHODS: tuple[str, ...] = get_args(Method)
STAGES: tuple[str, ...] = get_args(Stage)


@dataclass
class SamplingConfig:
    """How the policy samples its replies; REFUEL's log-probs are taken at the same temperature."""

    max_new_tokens: int = same_as(SamplingParams, "max_new_tokens")
    temperature: float = same_as(SamplingParams, "temperature")
    top_p: float = same_as(SamplingParams, "top_p")

    def sampling_params(self, seed: int | None = None) -> SamplingParams:
        """These settings as the engines' :class:`~dialogsim.sampling.SamplingParams`."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=seed
        )


@dataclass
class SeedConfig:
    """The seed of everything drawn: prompts, H and h, sampling, data order, initialisation."""

    seed: int = setting(
        0, help="seed of prompt choice, collection, sampling and data order", shapes="dialogues", valid=NON_NEGATIVE
    )


@dataclass
class CollectionConfig:
    """What REFUEL pairs are collected from: π_0, how many, the horizon, the method and where pairs start."""

    policy_model: str = setting(DEFAULT_MODEL, help="π_0: model name, folder or hub id", shapes="dialogues")
    pairs_per_iteration: int = setting(32, help="reset points tried per iteration", shapes="pairs", valid=Range(2))
    max_horizon: int = same_as(EpisodeConfig, "max_horizon")
    generation_batch_size: int = setting(
        32, help="pairs advanced together in collection", shapes="dialogues", valid=AT_LEAST_ONE
    )
    method: Method = setting(
        "refuel",
        help="refuel (roll in with π_t, h ~ U{1..H}) | rebel_lt / dpo_lt (paper's last-turn baselines: "
        "roll in with π_ref = the initial policy, reset at h = H, REBEL regression / DPO loss)",
        shapes="pairs",
    )
    rollin: Rollin = setting(
        "current",
        help="where REFUEL pairs start: current (roll in with π_t) | initial (roll in with π_ref, the initial "
        "policy; PPO++ idea) | dataset (prefixes of offline dialogues; DR-PO idea)",
        shapes="pairs",
    )
    rollin_beta: float = setting(
        0.0, help="β: share of pairs starting at the prompt (h = 1) with --rollin initial", shapes="pairs", valid=SHARE
    )
    dataset_weight: float = setting(
        0.5,
        help="w: share of pairs reset to an offline-dialogue prefix with --rollin dataset",
        shapes="pairs",
        valid=SHARE,
    )
    offline_dialogues: str | None = setting(
        None,
        help="offline dialogues for --rollin dataset: .jsonl/.parquet with 'messages', or a hub id",
        shapes="pairs",
    )
    offline_limit: int | None = setting(
        None, help="keep at most this many offline dialogues (seeded shuffle)", shapes="pairs", valid=AT_LEAST_ONE
    )


@dataclass
class TrainingConfig:
    """The regression π_t → π_{t+1}: loss, optimizer, batching, precision, memory, LoRA."""

    eta: float = setting(
        10.0, help="η in the REFUEL loss (paper: 1e3 with raw ArmoRM scores)", shapes="training", valid=POSITIVE
    )
    dpo_beta: float = setting(0.1, help="β of the DPO loss (method dpo_lt)", shapes="training", valid=POSITIVE)
    learning_rate: float = setting(
        1e-6, help="AdamW learning rate (paper: 3e-7 for 8B)", shapes="training", valid=POSITIVE
    )
    adam_beta1: float = setting(0.9, help="AdamW β1", shapes="training", valid=FRACTION)
    adam_beta2: float = setting(0.95, help="AdamW β2", shapes="training", valid=FRACTION)
    weight_decay: float = setting(1e-6, help="AdamW weight decay", shapes="training", valid=NON_NEGATIVE)
    warmup_ratio: float = setting(
        0.1, help="fraction of steps of linear warm-up before cosine", shapes="training", valid=FRACTION
    )
    epochs: int = setting(1, help="passes over an iteration's pairs", shapes="training", valid=AT_LEAST_ONE)
    per_device_batch_size: int = setting(4, help="pairs per micro-batch", shapes="training", valid=AT_LEAST_ONE)
    gradient_accumulation_steps: int = setting(
        2, help="micro-batches per optimizer step", shapes="training", valid=AT_LEAST_ONE
    )
    effective_batch_size: int | None = setting(
        None,
        help="pairs per optimizer step, checked = per_device × accumulation × processes; unset: no check",
        shapes=None,
        valid=AT_LEAST_ONE,
    )
    max_grad_norm: float = setting(1.0, help="gradient clipping norm", shapes="training", valid=POSITIVE)
    validation_fraction: float = setting(
        0.2, help="share of pairs held out for validation", shapes="training", valid=FRACTION
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = setting(
        "no",
        help="accelerate mixed precision: no | bf16 | fp16 (bf16 diverged on CPU at lr 1e-6: README)",
        shapes="training",
    )
    pair_layout: Literal["shared_prefix", "separate"] = setting(
        "shared_prefix",
        help="how a pair's log-probs are computed: shared_prefix (s_h once, y and y' after it under a block "
        "mask, logits at reply positions only) | separate (two padded sequences, logits everywhere)",
        shapes="training",
    )
    length_buckets: bool = setting(
        True, help="put pairs of similar length in one micro-batch (less padding)", shapes="training"
    )
    gradient_checkpointing: bool = setting(
        False, help="recompute activations in the backward pass: less memory, ~30 % more time", shapes=None
    )
    lora_r: int = setting(
        0, help="LoRA rank (needs peft); 0 = full fine-tuning. Merged on save", shapes="training", valid=NON_NEGATIVE
    )
    lora_alpha: int = setting(
        32, help="LoRA α; the adapter update is scaled by α / lora_r", shapes="training", valid=POSITIVE
    )
    lora_dropout: float = setting(
        0.0, help="LoRA dropout; 0 keeps the loss at π = π_t exact", shapes="training", valid=FRACTION
    )
    lora_target_modules: list[str] = setting(
        default_factory=lambda: ["all-linear"],
        help="LoRA modules: all-linear, or names like q_proj v_proj",
        shapes="training",
    )


@dataclass
class RunConfig:
    """The run folder, how many iterations, checkpoints: nothing a stage's result depends on."""

    output_dir: str = setting("runs/refuel", help="run directory (pairs, checkpoints, metrics)", shapes=None)
    iterations: int = setting(1, help="REFUEL iterations t = 0..T-1 (paper: 2)", shapes=None, valid=AT_LEAST_ONE)
    checkpoint_every: int = setting(
        10, help="optimizer steps between resumable training checkpoints (0: none)", shapes=None, valid=NON_NEGATIVE
    )
    checkpoint_minutes: float = setting(
        2.0,
        help="also checkpoint once this many minutes of training passed since the last checkpoint (0: never); "
        "a checkpoint of SmolLM2-135M is ~1.6 GB (fp32 weights + AdamW's two moments)",
        shapes=None,
        valid=NON_NEGATIVE,
    )
    restart_stage: Stage | None = setting(
        None,
        help="collection | training: start that stage over in a run folder whose recorded settings differ "
        "(the stage's files and every later iteration are removed); unset: a differing rerun is refused",
        shapes=None,
    )


@dataclass
class DialogueConfig(SeedConfig, SamplingConfig, SimulatorConfig):
    """The groups every command has: simulator and engines, sampling, seed (how its dialogues are generated)."""


RULES = (
    *SIMULATOR_RULES,
    Rule(
        ("temperature", "eta"),
        lambda c: c.temperature > 0,
        "> 0 for training: REFUEL's log-probs are taken at the sampling temperature (0, greedy, is for evaluation)",
    ),
    Rule(
        ("max_new_tokens", "max_dialogue_tokens"),
        lambda c: c.max_new_tokens < c.max_dialogue_tokens,
        "below max_dialogue_tokens: one reply must fit in the dialogue's token budget",
    ),
    Rule(
        ("rollin", "method"),
        lambda c: c.rollin == "current" or c.method == "refuel",
        "current with --method rebel_lt / dpo_lt: the last-turn baselines roll in with π_ref at h = H",
    ),
    Rule(
        ("offline_dialogues", "rollin"),
        lambda c: c.rollin != "dataset" or bool(c.offline_dialogues),
        "a file or hub id of offline dialogues with --rollin dataset",
    ),
    Rule(("lora_target_modules",), lambda c: bool(c.lora_target_modules), "all-linear, or module names"),
)
"""Every combination of fields a command's config must hold, written once: each is checked for the configs that
have all of its fields (``temperature > 0`` only where there is a loss, ``eta``)."""


@dataclass
class RefuelConfig(RunConfig, TrainingConfig, CollectionConfig, DialogueConfig):
    """Everything a REFUEL run needs; the command lines of ``refuel-train`` and ``refuel-plan`` are generated from it.

    Defaults are the CPU main job (SmolLM2-135M-Instruct, shared Math_CoT prompts). The paper's GPU values
    (Llama-3-8B-it) are noted in the help lines.

    Raises:
        UsageError: (a ``ValueError``) a field of the wrong type, out of range, or in a combination that does not
            run (:data:`RULES`), naming each one and what is valid.
    """

    rules = RULES


@dataclass
class EvaluationConfig:
    """The evaluation dialogues: the baseline policy, which held-out prompts, the horizon."""

    baseline: str = setting(DEFAULT_MODEL, help="baseline policy (π_0)", shapes="dialogues")
    n_prompts: int = setting(
        16, help="held-out prompts evaluated (dialogues per policy)", shapes="dialogues", valid=AT_LEAST_ONE
    )
    all_rows: bool = setting(
        False,
        help="evaluate every row of --prompts that passes the filters (--tasks/--datasets/--splits, where "
        "'all' keeps every value, and --max_prompt_tokens) instead of --n_prompts of the --holdout rows",
        shapes="dialogues",
    )
    horizon: int = setting(3, help="H: turns per evaluation dialogue (paper: 5)", shapes="dialogues", valid=HORIZON)


@dataclass
class JudgeConfig:
    """The pairwise judge of two dialogues truncated at turn h (:func:`dialogsim.judges.build_judge`)."""

    judge: str = setting(
        "reward",
        help="reward (--reward scores each truncated dialogue; ties ½) | llm (pairwise chat judge) | "
        "package.module:name or an installed plugin's name: a judge of your own (README 'Your own reward')",
        shapes=None,
    )
    judge_backend: Literal["transformers", "vllm", "openai"] = setting(
        "transformers", help="LLM judge engine: transformers | vllm | openai", shapes=None
    )
    judge_model: str = setting(DEFAULT_MODEL, help="LLM judge model (for openai: the server's model name)", shapes=None)
    judge_base_url: str | None = setting(
        None, help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1", shapes=None
    )
    judge_max_new_tokens: int = setting(192, help="cap on LLM judge reply tokens", shapes=None, valid=AT_LEAST_ONE)
    judge_template: Literal["compare", "letter"] = setting(
        "compare",
        help="LLM judge prompt: compare (comparison, then A/B) | letter (A/B only; small models)",
        shapes=None,
    )


@dataclass
class CandidatesConfig:
    """The policies judged against the baseline and where their dialogues and reports go."""

    candidates: list[str] = setting(
        default_factory=lambda: ["runs/refuel/iteration_0/policy"], help="candidate policies", shapes=None
    )
    output_dir: str = setting("runs/refuel/eval", help="where dialogues and reports go", shapes=None)


@dataclass
class EvaluateConfig(CandidatesConfig, JudgeConfig, EvaluationConfig, DialogueConfig):
    """Settings of a per-turn win-rate evaluation; the ``refuel-evaluate`` flags are generated from it.

    Raises:
        UsageError: as :class:`RefuelConfig`; ``temperature`` 0 is valid here (greedy replies), not in training,
            whose log-probs are taken at the temperature.
    """

    rules = RULES


# What each stage of a run depends on (refuel.run_folder) and what shapes an evaluation's dialogues (its cache key),
# read off each field's ``shapes``.
COLLECTION_FIELDS = field_names(RefuelConfig, shapes=("dialogues", "pairs"))
TRAINING_FIELDS = field_names(RefuelConfig, shapes=SHAPES)
GENERATION_FIELDS = field_names(EvaluateConfig, shapes=("dialogues",))
