"""One REFUEL iteration of gradient steps on ``accelerate``: π_t → π_{t+1}.

The same code runs in one process or under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3, FSDP; the
configs are in ``configs/accelerate/``). What makes P processes × b pairs equal 1 process × P·b pairs:

- **Data**: the pairs are cut once into step groups of P·b·accumulation pairs and those into micro-batches
  of b (:func:`refuel.training.layout.plan_micro_batches`); every process draws the same seeded order of
  groups each epoch (:mod:`refuel.training.batching`), and ``accelerate`` gives process p the micro-batches
  p, p + P, p + 2P, … of that order, so one optimizer step sees the same pairs as a single process with P
  times the batch (``even_batches``: a short last round is filled with micro-batches from the start of the
  epoch).
- **Loss normalisation**: the REFUEL loss is the mean over the local micro-batch; ``accelerate``
  divides it by the accumulation steps and DDP (or the sharded engine) averages gradients over the
  processes, so the gradient is that of the mean over the global batch. Equal local batch sizes are
  what makes the mean of means the global mean.
- **Schedule**: warm-up and cosine are counted in optimizer steps. ``accelerate`` steps a prepared
  scheduler P times per optimizer step, so it is built with P × the step counts.
- **π_t log-probs**: an explicit step, :meth:`RefuelTrainer.compute_logp_t`, once, before any gradient
  step, on the same fixed micro-batches that training uses, so the computation is identical and the
  relative log-ratio at π = π_t is exactly 0; each process computes an equal share of the micro-batches
  (sharded engines run their forward passes in lock-step) and the shares are all-gathered, so no reference
  model stays resident.
- **Pair layout**: ``shared_prefix`` (default) computes s_h once per pair and logits at the reply
  positions only; ``separate`` runs two padded sequences per pair (:mod:`refuel.training.layout`).
- **Saving**: only the main process writes; DeepSpeed ZeRO-3 and FSDP first gather the full weights.
- **Launch**: the ``Accelerator`` must run the engine and process count the launch asked for; FSDP2 on
  CPU processes is sharded by refuel itself (:mod:`refuel.training.distributed`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from refuel.config import RefuelConfig
from refuel.pairs import ScoredPair, TokenizedPair
from refuel.training.batching import StepGroupSampler, effective_batch_mismatch, step_schedule
from refuel.training.checkpoints import latest_training_state, save_training_state
from refuel.training.distributed import build_accelerator, full_state_dict, fully_shard_on_cpu
from refuel.training.layout import (
    PairBatch,
    collate,
    pair_logp_t,
    pair_rewards,
    plan_micro_batches,
    sequence_logprobs,
)
from refuel.training.loss import LossInputs, dpo_loss, refuel_loss, sign_agreement


class NonFiniteTrainingError(RuntimeError):
    """A loss or the gradient norm of an optimizer step is not finite; the step was not taken."""


@dataclass
class ValidationMetrics:
    """REFUEL loss (nats²) and sign agreement on held-out pairs (NaN when there are none)."""

    loss: float
    sign_agreement: float


@dataclass(frozen=True)
class ScoredSplits:
    """An iteration's pairs with π_t's log-probs (:meth:`RefuelTrainer.compute_logp_t`), each split in given order."""

    train: list[ScoredPair]
    validation: list[ScoredPair]


def apply_memory_options(model: PreTrainedModel, config: RefuelConfig) -> torch.nn.Module:
    """Gradient checkpointing and LoRA adapters on π_t, as the run config asks.

    Args:
        model: π_t, a plain causal LM (never one with adapters: each iteration starts from merged weights).
        config: ``gradient_checkpointing``, ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``.

    Returns:
        ``model`` itself, or a ``peft.PeftModel`` around it whose only trainable parameters are the
        adapters. The adapters start at zero (LoRA's B = 0), so the returned model computes π_t exactly;
        LoRA's A is drawn from ``config.seed`` (the same in every process and every launch).

    Raises:
        ImportError: ``lora_r > 0`` without ``peft`` installed (the message says what to install).
    """
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP, FSDP and frozen (LoRA) base weights.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora_r == 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError(
            "lora_r > 0 needs peft: pip install 'dialogsim[lora]' (or pip install peft), or set lora_r 0"
        ) from error
    targets = list(config.lora_target_modules)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):  # lora_A's random init from config.seed, global RNG untouched
        torch.manual_seed(config.seed)
        return get_peft_model(model, lora)


class RefuelTrainer:
    """Fits π_{t+1} to the REFUEL least-squares objective on one iteration's pairs (DPO's for ``dpo_lt``).

    Args:
        config: run configuration (optimizer, schedule, batch sizes, η, temperature, memory options).
        model: π_t, trained in place into π_{t+1}. With LoRA the adapters are merged into it by
            :meth:`save`.
        tokenizer: the policy's tokenizer (pad id).
        train_pairs / val_pairs: tokenised pairs (see :func:`refuel.pairs.tokenize_pair`), the same
            lists in every process. Their π_t log-probs are the next step (:meth:`compute_logp_t`), before
            :meth:`train`, :meth:`validate` or :meth:`metrics_at_pi_t`.

    Attributes:
        plans: ``"train"`` and ``"validation"``: the pair indices of each fixed micro-batch.
        total_steps: optimizer steps of :meth:`train` (``epochs`` × steps per epoch).
        effective_batch_size: pairs per optimizer step, per device × accumulation × processes.

    Raises:
        ValueError: no training pairs; invalid memory options; the launch gives another accumulation
            or effective batch than the config; LoRA with a sharded engine (DeepSpeed, FSDP).
        ImportError: LoRA without ``peft``.
        LaunchMismatchError: the ``Accelerator`` runs another engine or process count than the launch
            asked for (see :mod:`refuel.training.distributed`).
        RuntimeError: ``accelerate`` sharded the pairs otherwise than the step count assumes.
    """

    def __init__(
        self,
        config: RefuelConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        train_pairs: list[TokenizedPair],
        val_pairs: list[TokenizedPair],
    ) -> None:
        if not train_pairs:
            raise ValueError("no training pairs: collect more pairs or lower validation_fraction")
        self.config = config
        self.accelerator = build_accelerator(config)  # refuses a launch that fell back to another engine
        processes = self.accelerator.num_processes
        accumulation = config.gradient_accumulation_steps
        self.effective_batch_size = config.per_device_batch_size * accumulation * processes
        self._check_launch()
        self.pad_id = tokenizer.pad_token_id
        self._merged = False
        self._non_finite_loss = False  # a micro-batch loss of the step being accumulated was not finite
        model = fully_shard_on_cpu(apply_memory_options(model, config), self.accelerator)
        group = self.effective_batch_size  # pairs per optimizer step
        # What the loaders collate: the tokenised pairs, then (compute_logp_t) the same pairs with π_t's log-probs.
        self._pairs: dict[str, Sequence[TokenizedPair]] = {"train": train_pairs, "validation": val_pairs}
        self._scored = False
        self.plans = {
            split: plan_micro_batches(pairs, config.per_device_batch_size, group, config.seed, config.length_buckets)
            for split, pairs in self._pairs.items()
        }
        train_loader = DataLoader(
            range(len(self.plans["train"])),  # loader items are micro-batch indices, collated by _collate_micro_batch
            batch_size=1,
            sampler=StepGroupSampler(len(self.plans["train"]), group // config.per_device_batch_size, config.seed),
            collate_fn=partial(self._collate_micro_batch, "train"),
        )
        optimizer = torch.optim.AdamW(
            [parameter for parameter in model.parameters() if parameter.requires_grad],
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        schedule = step_schedule(len(self.plans["train"]), processes, accumulation, config.epochs, config.warmup_ratio)
        batches_per_process, steps, warmup = schedule.micro_batches_per_process, schedule.steps, schedule.warmup
        # × P: accelerate steps the scheduler P times per optimizer step.
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup * processes, steps * processes)
        self.model, self.optimizer, self.train_loader, self.scheduler = self.accelerator.prepare(
            model, optimizer, train_loader, scheduler
        )
        if len(self.train_loader) != batches_per_process:
            raise RuntimeError(
                f"accelerate gave {len(self.train_loader)} micro-batches per process, expected {batches_per_process}; "
                "the step count and schedule assume its default even_batches sharding"
            )
        if self.accelerator.gradient_accumulation_steps != accumulation:  # DeepSpeed's config wins in prepare
            raise ValueError(
                f"the DeepSpeed config sets {self.accelerator.gradient_accumulation_steps} accumulation steps, the "
                f"run config {accumulation}; remove gradient_accumulation_steps from the accelerate config"
            )
        self.total_steps = steps
        self.eval_loaders = {
            split: self.accelerator.prepare(
                DataLoader(
                    range(len(self.plans[split])), batch_size=1, collate_fn=partial(self._collate_micro_batch, split)
                )
            )
            if pairs
            else None
            for split, pairs in self._pairs.items()
        }

    def _check_launch(self) -> None:
        """The launch agrees with the config: accumulation and effective batch."""
        config, accelerator = self.config, self.accelerator
        if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
            raise ValueError(
                f"accelerate runs {accelerator.gradient_accumulation_steps} accumulation steps (from "
                "ACCELERATE_GRADIENT_ACCUMULATION_STEPS or the accelerate config), the run config "
                f"{config.gradient_accumulation_steps}; set gradient_accumulation_steps in the run config only"
            )
        if mismatch := effective_batch_mismatch(config, accelerator.num_processes):
            raise ValueError(f"effective batch: {mismatch}")

    @torch.no_grad()
    def compute_logp_t(self) -> ScoredSplits:
        """ln π_t(y|s_h) and ln π_t(y'|s_h) of every pair: the step of an iteration before the gradient steps.

        The log-probs are computed once, on the very micro-batches that training and validation use (same
        pairs, same padding, same precision: ``accelerate``'s autocast), so at π = π_t the relative log-ratio
        is exactly 0, in bf16 too. Collective: every process computes its share of the micro-batches. From
        here on the loaders collate the returned records.

        Returns:
            Both splits as new :class:`~refuel.pairs.ScoredPair` records, in the order they were given.

        Raises:
            RuntimeError: called a second time (π may have moved from π_t).
        """
        if self._scored:
            raise RuntimeError("π_t's log-probs are computed once per trainer, before any gradient step")
        scored = ScoredSplits(train=self._with_logp_t("train"), validation=self._with_logp_t("validation"))
        self._pairs = {"train": scored.train, "validation": scored.validation}
        self._scored = True
        return scored

    def _with_logp_t(self, split: str) -> list[ScoredPair]:
        """The pairs of ``split`` with ln π_t(y|s_h), ln π_t(y'|s_h), as new records in their given order."""
        loader = self.eval_loaders[split]
        if loader is None:
            return []
        self.model.eval()
        temperature = self.config.temperature
        logp = self._per_micro_batch(loader, lambda batch: sequence_logprobs(self.model, batch, temperature).float())
        values: dict[int, tuple[float, float]] = {}  # pair index -> (ln π_t(y|s_h), ln π_t(y'|s_h))
        for index, micro_batch in enumerate(self.plans[split]):
            y, y_prime = torch.tensor_split(logp[index], 2)  # [B], [B]: the B replies y, then the B replies y'
            values.update(zip(micro_batch, zip(y.tolist(), y_prime.tolist(), strict=True), strict=True))
        return [
            ScoredPair(**pair, logp_t=values[index][0], logp_t_prime=values[index][1])
            for index, pair in enumerate(self._pairs[split])
        ]

    def _per_micro_batch(self, loader: DataLoader, compute: Callable[[Any], torch.Tensor]) -> dict[int, torch.Tensor]:
        """``compute`` of every micro-batch of ``loader``, keyed by micro-batch index, in every process.

        Each process computes its share (``accelerate`` repeats micro-batches from the start to give every
        process as many); the shares are all-gathered and the repeats dropped by index.
        """
        results = [(index, compute(batch).cpu()) for index, batch in loader]
        if self.accelerator.num_processes > 1:
            results = gather_object(results)
        return dict(results)

    def _collate_micro_batch(self, split: str, items: list[int]) -> tuple[int, PairBatch]:
        """A loader item, micro-batch ``index`` of ``split``: that index and its pairs, collated."""
        (index,) = items
        pairs = [self._pairs[split][i] for i in self.plans[split][index]]
        return index, collate(pairs, self.config.pair_layout, self.pad_id)

    def _loss_inputs(self, batch: PairBatch) -> LossInputs:
        """ln π and ln π_t of a micro-batch's B pairs' replies, and their rewards, ``[B]`` each.

        Raises:
            RuntimeError: the batch has no π_t log-probs (:meth:`compute_logp_t` was not called).
        """
        if batch.logp_t is None:
            raise RuntimeError("the pairs have no π_t log-probs yet: call RefuelTrainer.compute_logp_t() first")
        logp = sequence_logprobs(self.model, batch, self.config.temperature)  # [2B]
        return LossInputs.from_replies(logp, batch.logp_t, batch.reward)

    def _loss(self, batch: PairBatch) -> torch.Tensor:
        """The micro-batch's REFUEL loss (also REBEL-LT's, on last-turn pairs), or DPO's for ``dpo_lt``."""
        inputs = self._loss_inputs(batch)
        if self.config.method == "dpo_lt":
            return dpo_loss(inputs, self.config.dpo_beta)
        return refuel_loss(inputs, self.config.eta)

    @torch.no_grad()
    def validate(self, split: str = "validation") -> ValidationMetrics:
        """REFUEL loss and sign agreement of the current policy on the ``"validation"`` or ``"train"`` pairs.

        Each process scores its share of the micro-batches; the terms of all pairs are gathered (repeats of
        the padded last round dropped), so every process returns the metrics of the whole split.

        Raises:
            RuntimeError: before :meth:`compute_logp_t`.
        """
        loader = self.eval_loaders[split]
        if loader is None:
            return ValidationMetrics(float("nan"), float("nan"))
        self.model.eval()
        inputs = self._per_micro_batch(loader, lambda batch: torch.stack(self._loss_inputs(batch)))  # [6, B] each
        return self._metrics(LossInputs(*torch.cat([inputs[index] for index in sorted(inputs)], dim=1)))  # [N] each

    def metrics_at_pi_t(self, split: str = "validation") -> ValidationMetrics:
        """What :meth:`validate` returns before the first gradient step, computed without a forward pass.

        π_t's log-probs come from the very micro-batches and precision that :meth:`validate` runs, so at
        π = π_t every relative log-ratio is exactly 0 (``tests/test_layout.py`` checks both agree under bf16
        autocast, in both pair layouts): the loss is η² · mean (r − r')² and the sign agreement 0 (NaN where
        every pair is a tie). It saves one no-grad pass over the split per iteration.

        Raises:
            RuntimeError: before :meth:`compute_logp_t`.
        """
        pairs = self._pairs[split]
        if not pairs:
            return ValidationMetrics(float("nan"), float("nan"))
        logp_t = pair_logp_t(pairs)  # [2N]
        if logp_t is None:
            raise RuntimeError(f"the {split} pairs have no π_t log-probs yet: call RefuelTrainer.compute_logp_t()")
        return self._metrics(LossInputs.from_replies(logp_t, logp_t, pair_rewards(pairs)))

    def _metrics(self, inputs: LossInputs) -> ValidationMetrics:
        """REFUEL loss and sign agreement of N pairs' ``inputs``."""
        loss = refuel_loss(inputs, self.config.eta).item()
        return ValidationMetrics(loss, sign_agreement(inputs.relative_log_ratio(), inputs.reward - inputs.reward_prime))

    def training_step(self, batch: PairBatch) -> torch.Tensor:
        """Forward and backward of one micro-batch of pairs; an optimizer step when accumulation is complete.

        Returns:
            The micro-batch's REFUEL loss (detached scalar, nats²).

        Raises:
            NonFiniteTrainingError: at the end of an accumulation, a micro-batch loss or the gradient norm
                was not finite (in any process); the optimizer step is not taken, so the weights stay those
                of the last good step.
        """
        with self.accelerator.accumulate(self.model):
            loss = self._loss(batch)
            self._non_finite_loss |= not bool(torch.isfinite(loss.detach()))
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
                self._check_finite(loss, norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return loss.detach()

    def _check_finite(self, loss: torch.Tensor, norm: torch.Tensor | None) -> None:
        """Raise (in every process alike) if a loss of this step or the gradient norm is not finite.

        ``norm`` is the global norm (None where the engine clips by itself, e.g. DeepSpeed); the loss flags
        are summed over the processes, so all of them stop at the same step.
        """
        bad_norm = norm is not None and not bool(torch.isfinite(norm))
        flags = torch.tensor([float(self._non_finite_loss), float(bad_norm)], device=self.accelerator.device)
        self._non_finite_loss = False
        bad_loss, bad_norm = (self.accelerator.reduce(flags, reduction="sum") > 0).tolist()
        if bad_loss or bad_norm:
            norm_text = "unknown" if norm is None else f"{float(norm):g}"
            raise NonFiniteTrainingError(
                f"{'a micro-batch loss' if bad_loss else 'the gradient norm'} is not finite (last micro-batch loss "
                f"{loss.item():g}, gradient norm {norm_text}); the optimizer step was not taken. Check the pairs' "
                "rewards for huge values (collection.json, pairs.jsonl), or lower eta or learning_rate"
            )

    def train(
        self, checkpoints: Path | None = None, checkpoint_every: int = 0, checkpoint_minutes: float = 0.0
    ) -> list[dict[str, float]]:
        """Run ``epochs`` passes of gradient steps; returns the per-optimizer-step log.

        Each entry has ``loss`` (the step's mean micro-batch loss over all processes, nats²) and ``lr``
        (the learning rate of the next step).

        Args:
            checkpoints: folder of resumable training state (see :mod:`refuel.training.checkpoints`). If it holds
                a checkpoint, training resumes from it: weights, optimizer, scheduler and RNG states are
                restored and the micro-batches already trained on are skipped (the seeded data order is
                replayed, so the rest comes in the same order as in an uninterrupted run).
            checkpoint_every: write a checkpoint every this many optimizer steps (0: never).
            checkpoint_minutes: also write one after a step that ends this many minutes (wall clock, the
                main process's) after the last checkpoint or the start (0: never). No checkpoint follows
                the last step: π_{t+1} is saved next.

        Raises:
            RuntimeError: called before :meth:`compute_logp_t`, or after :meth:`save` merged LoRA adapters into
                the weights.
            NonFiniteTrainingError: a loss or gradient of step n is not finite; the weights are those after
                step n − 1 (never updated with non-finite values) and the checkpoints stay on disk.
        """
        if self._merged:
            raise RuntimeError("save() merged the LoRA adapters into π_{t+1}; start a new RefuelTrainer to train on")
        if not self._scored:
            raise RuntimeError("train() needs π_t's log-probs first: call RefuelTrainer.compute_logp_t()")
        resumed = latest_training_state(checkpoints) if checkpoints is not None else None
        done, log = (-1, -1), []
        if resumed is not None:
            self.accelerator.load_state(str(resumed[0]))
            position = resumed[1]
            done, log = (position["epoch"], position["batch"]), position["log"]
            self.accelerator.step = position["accelerate_step"]
        progress = tqdm(
            total=self.total_steps,
            initial=len(log),
            desc="REFUEL steps",
            unit="step",
            disable=not self.accelerator.is_local_main_process,
        )
        last_checkpoint = time.monotonic()
        for epoch in range(self.config.epochs):
            self.model.train()
            losses: list[torch.Tensor] = []
            for index, (_, batch) in enumerate(self.train_loader):
                if (epoch, index) <= done:
                    continue  # trained on before the checkpoint; iterating keeps the data order
                try:
                    losses.append(self.training_step(batch))
                except NonFiniteTrainingError as error:
                    kept = f"; the last checkpoint is in {checkpoints}" if checkpoints is not None else ""
                    raise NonFiniteTrainingError(
                        f"training stopped at optimizer step {len(log) + 1} of {self.total_steps}: {error}. The "
                        f"weights are those after step {len(log)}; nothing was saved{kept}"
                    ) from None
                if not self.accelerator.sync_gradients:
                    continue
                loss = self.accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
                losses = []
                log.append({"loss": loss, "lr": self.scheduler.get_last_lr()[0]})
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}")
                minutes = (time.monotonic() - last_checkpoint) / 60
                due = bool(checkpoint_every and len(log) % checkpoint_every == 0)
                due |= bool(checkpoint_minutes and minutes >= checkpoint_minutes)
                if checkpoints is not None and len(log) < self.total_steps and self._agree(due):
                    position = {"epoch": epoch, "batch": index, "accelerate_step": self.accelerator.step, "log": log}
                    save_training_state(self.accelerator, checkpoints, len(log), position)
                    last_checkpoint = time.monotonic()
        progress.close()
        return log

    def _agree(self, decision: bool) -> bool:
        """The main process's ``decision``, in every process (a checkpoint is collective; clocks differ)."""
        if self.accelerator.num_processes == 1:
            return decision
        return broadcast_object_list([decision])[0]

    def save(self, folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        """Write π_{t+1} as a plain ``save_pretrained`` folder, atomically (staging folder, then rename).

        Collective: every process must call it. With LoRA the adapters are first merged into the
        weights (``peft``'s ``merge_and_unload``, on every process), so the folder holds a plain model
        that the next iteration loads as π_t, and the trainer's model is that plain model afterwards.
        DeepSpeed ZeRO-3 / FSDP gather the full state dict (ZeRO-3: 16-bit weights); only the main
        process writes.

        Raises:
            NonFiniteTrainingError: a weight is NaN or infinite (nothing is written).
        """
        if self.config.lora_r and not self._merged:
            self.model = self.accelerator.unwrap_model(self.model).merge_and_unload()
            self._merged = True
        bad = [name for name, weight in self.model.named_parameters() if not weight.detach().isfinite().all()]
        flag = torch.tensor([float(bool(bad))], device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item():  # every process's shard, so all stop alike
            raise NonFiniteTrainingError(
                f"refusing to save π_(t+1) to {folder}: non-finite weights ({bad[:3] or 'in another process'})"
            )
        self.accelerator.wait_for_everyone()
        state_dict = full_state_dict(self.accelerator, self.model)  # collective; None when not sharded
        if self.accelerator.is_main_process:
            save_pretrained_atomic(self.accelerator.unwrap_model(self.model), tokenizer, folder, state_dict)
        self.accelerator.wait_for_everyone()


def save_pretrained_atomic(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """``save_pretrained`` model and tokenizer into ``folder`` so that it appears complete or not at all.

    Args:
        state_dict: weights to write instead of ``model.state_dict()`` (the gathered weights of a
            sharded model).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
