"""Configuration of a REFUEL run: one dataclass, every field with a default and a help line."""

from __future__ import annotations

from dataclasses import dataclass, field

from dialogsim.backends.factory import BACKENDS
from dialogsim.backends.serving import ServingEngine
from refuel.validation import check_fields

METHODS = ("refuel", "rebel_lt", "dpo_lt")
PAIR_LAYOUTS = ("shared_prefix", "separate")
ROLLINS = ("current", "reference", "dataset")  # as refuel.collect.ROLLINS
RESTARTABLE_STAGES = ("collection", "training")  # as refuel.stages.STAGE_FIELDS


def _help(text: str) -> dict[str, str]:
    return {"help": text.replace("%", "%%")}  # argparse %-formats help strings


@dataclass
class RefuelConfig:
    """Everything a REFUEL run needs; the command line of ``refuel-train`` is generated from it.

    Defaults are the CPU main job (SmolLM2-135M-Instruct, shared Math_CoT prompts). The paper's GPU
    values (Llama-3-8B-it, DESIGN.md §4) are noted in the help lines.
    """

    output_dir: str = field(default="runs/refuel", metadata=_help("run directory (pairs, checkpoints, metrics)"))
    policy_model: str = field(default="smollm2-135m-instruct", metadata=_help("π_0: model name, folder or hub id"))
    user_model: str = field(default="smollm2-135m-instruct", metadata=_help("simulated-user model (fixed)"))
    user_template: str = field(default="student", metadata=_help("user prompt: 'student' (small) or 'paper'"))
    reward: str = field(default="math", metadata=_help("'math' (verifier + MiniLM) or a seq-cls RM id/path"))
    trust_remote_code: bool = field(
        default=False, metadata=_help("let a hub reward model run its own code (ArmoRM needs it)")
    )
    prompts: str | None = field(default=None, metadata=_help("prompt file or hub id; default: shared file"))
    tasks: list[str] | None = field(default_factory=lambda: ["Math_CoT"], metadata=_help("UltraInteract tasks to keep"))
    datasets: list[str] | None = field(default_factory=lambda: ["gsm8k"], metadata=_help("source datasets to keep"))
    splits: list[str] | None = field(default_factory=lambda: ["train"], metadata=_help("source splits to keep"))
    holdout: int = field(default=64, metadata=_help("prompts reserved for evaluation (never trained on)"))
    iterations: int = field(default=1, metadata=_help("REFUEL iterations t = 0..T-1 (paper: 2)"))
    pairs_per_iteration: int = field(default=32, metadata=_help("reset points tried per iteration"))
    max_horizon: int = field(default=3, metadata=_help("H is drawn uniformly from 1..max_horizon (paper: 5)"))
    max_new_tokens: int = field(default=160, metadata=_help("cap on policy reply tokens (paper: 1024)"))
    temperature: float = field(default=0.8, metadata=_help("policy sampling and log-prob temperature (paper: 0.8)"))
    top_p: float = field(default=1.0, metadata=_help("policy nucleus sampling mass"))
    max_prompt_tokens: int = field(default=384, metadata=_help("drop prompts longer than this (tokens)"))
    max_dialogue_tokens: int = field(default=2048, metadata=_help("token budget per dialogue; pairs past it drop"))
    generation_batch_size: int = field(default=32, metadata=_help("pairs advanced together in collection"))
    backend: str = field(default="transformers", metadata=_help("policy roll-out engine: transformers | vllm"))
    user_backend: str = field(
        default="auto",
        metadata=_help(
            "simulated-user engine: auto (the policy's; on vllm the user shares π_t's engine when its model has "
            "π_0's architecture, weights swapped per call once π_t differs) | transformers | vllm (an engine of "
            "its own) | openai (a server)"
        ),
    )
    user_base_url: str | None = field(
        default=None, metadata=_help("OpenAI-compatible server of the user model (user_backend=openai)")
    )
    vllm_kv_cache_gib: float = field(default=4.0, metadata=_help("vLLM KV-cache space per engine on CPU (GiB)"))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("vLLM tensor-parallel GPUs per engine"))
    method: str = field(
        default="refuel",
        metadata=_help(
            "refuel (roll in with π_t, h ~ U{1..H}) | rebel_lt / dpo_lt (paper's last-turn baselines: "
            "roll in with π_ref = the initial policy, reset at h = H, REBEL regression / DPO loss)"
        ),
    )
    dpo_beta: float = field(default=0.1, metadata=_help("β of the DPO loss (method dpo_lt)"))
    rollin: str = field(
        default="current",
        metadata=_help(
            "where REFUEL pairs start: current (roll in with π_t) | reference (π_ref; PPO++ idea) | "
            "dataset (prefixes of offline dialogues; DR-PO idea)"
        ),
    )
    rollin_beta: float = field(
        default=0.0, metadata=_help("β: share of pairs starting at the prompt (h = 1) with --rollin reference")
    )
    dataset_weight: float = field(
        default=0.5, metadata=_help("w: share of pairs reset to an offline-dialogue prefix with --rollin dataset")
    )
    offline_dialogues: str | None = field(
        default=None,
        metadata=_help("offline dialogues for --rollin dataset: .jsonl/.parquet with 'messages', or a hub id"),
    )
    offline_limit: int | None = field(
        default=None, metadata=_help("keep at most this many offline dialogues (seeded shuffle)")
    )
    eta: float = field(default=10.0, metadata=_help("η in the REFUEL loss (paper: 1e3 with raw ArmoRM scores)"))
    learning_rate: float = field(default=1e-6, metadata=_help("AdamW learning rate (paper: 3e-7 for 8B)"))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW β1"))
    adam_beta2: float = field(default=0.95, metadata=_help("AdamW β2"))
    weight_decay: float = field(default=1e-6, metadata=_help("AdamW weight decay"))
    warmup_ratio: float = field(default=0.1, metadata=_help("fraction of steps of linear warm-up before cosine"))
    epochs: int = field(default=1, metadata=_help("passes over an iteration's pairs"))
    checkpoint_every: int = field(
        default=10, metadata=_help("optimizer steps between resumable training checkpoints (0: none)")
    )
    checkpoint_minutes: float = field(
        default=2.0,
        metadata=_help(
            "also checkpoint once this many minutes of training passed since the last checkpoint (0: never); "
            "a checkpoint of SmolLM2-135M is ~1.6 GB (fp32 weights + AdamW's two moments)"
        ),
    )
    restart_stage: str | None = field(
        default=None,
        metadata=_help(
            "collection | training: start that stage over in a run folder whose recorded settings differ "
            "(the stage's files and every later iteration are removed); unset: a differing rerun is refused"
        ),
    )
    per_device_batch_size: int = field(default=4, metadata=_help("pairs per micro-batch"))
    gradient_accumulation_steps: int = field(default=2, metadata=_help("micro-batches per optimizer step"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm"))
    validation_fraction: float = field(default=0.2, metadata=_help("share of pairs held out for validation"))
    mixed_precision: str = field(
        default="no",
        metadata=_help("accelerate mixed precision: no | bf16 | fp16 (bf16 diverged on CPU at lr 1e-6: README)"),
    )
    pair_layout: str = field(
        default="shared_prefix",
        metadata=_help(
            "how a pair's log-probs are computed: shared_prefix (s_h once, y and y' after it under a block "
            "mask, logits at reply positions only) | separate (two padded sequences, logits everywhere)"
        ),
    )
    length_buckets: bool = field(
        default=True, metadata=_help("put pairs of similar length in one micro-batch (less padding)")
    )
    # memory and scale-out
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute activations in the backward pass: less memory, ~30 % more time")
    )
    lora_r: int = field(default=0, metadata=_help("LoRA rank (needs peft); 0 = full fine-tuning. Merged on save"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA α; the adapter update is scaled by α / lora_r"))
    lora_dropout: float = field(default=0.0, metadata=_help("LoRA dropout; 0 keeps the loss at π = π_t exact"))
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata=_help("LoRA modules: all-linear, or names like q_proj v_proj")
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata=_help("pairs per optimizer step, checked = per_device × accumulation × processes; unset: no check"),
    )
    seed: int = field(default=0, metadata=_help("seed of collection, data order and initialisation"))

    def __post_init__(self) -> None:
        check_fields(self)
        checks = {
            "backend": self.backend in ServingEngine.SYNCABLE,
            "method": self.method in METHODS,
            "pair_layout": self.pair_layout in PAIR_LAYOUTS,
            "rollin": self.rollin in ROLLINS and (self.rollin == "current" or self.method == "refuel"),
            "offline_dialogues": self.rollin != "dataset" or bool(self.offline_dialogues),
            "user_backend": self.user_backend in (*BACKENDS, "auto"),
            "user_base_url": self.user_backend != "openai" or bool(self.user_base_url),
            "restart_stage": self.restart_stage in (None, *RESTARTABLE_STAGES),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid RefuelConfig values: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
