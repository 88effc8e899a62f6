"""One REFUEL iteration of gradient steps on ``accelerate``: π_t → π_{t+1}."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from refuel.config import RefuelConfig
from refuel.logprobs import masked_sequence_logprobs
from refuel.loss import refuel_loss, sign_agreement
from refuel.pairs import pad_pairs, reference_logprobs


@dataclass
class ValidationMetrics:
    """REFUEL loss (nats²) and sign agreement on held-out pairs (NaN when there are none)."""

    loss: float
    sign_agreement: float


class RefuelTrainer:
    """Fits π_{t+1} to the REFUEL least-squares objective on one iteration's pairs.

    Args:
        config: run configuration (optimizer, schedule, batch sizes, η, temperature).
        model: π_t, trained in place into π_{t+1}.
        tokenizer: the policy's tokenizer (pad id).
        train_rows / val_rows: tokenised pairs (see :func:`refuel.pairs.tokenize_pair`). Their π_t
            log-probs ``ref_logp`` / ``ref_logp_prime`` are computed here once, before any gradient
            step, with the same precision (``accelerate`` autocast) as the training forward passes,
            so that the REFUEL loss at π = π_t is exactly η²(r − r')².
    """

    def __init__(
        self,
        config: RefuelConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        train_rows: list[dict[str, Any]],
        val_rows: list[dict[str, Any]],
    ) -> None:
        if not train_rows:
            raise ValueError("no training pairs: collect more pairs or lower validation_fraction")
        self.config = config
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=config.mixed_precision
        )
        self.pad_id = tokenizer.pad_token_id
        generator = torch.Generator().manual_seed(config.seed)
        train_loader = DataLoader(
            train_rows,
            batch_size=config.per_device_batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=self._collate,
        )
        self.eval_loaders = {
            name: DataLoader(rows, batch_size=config.per_device_batch_size, collate_fn=self._collate)
            for name, rows in (("train", train_rows), ("validation", val_rows))
        }
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        steps = config.epochs * math.ceil(len(train_loader) / config.gradient_accumulation_steps)
        # Floor, so that short iterations do not spend their first step at learning rate 0 (the warm-up
        # of transformers' schedules starts from 0).
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps), steps)
        self.model, self.optimizer, self.train_loader, self.scheduler = self.accelerator.prepare(
            model, optimizer, train_loader, scheduler
        )
        self.total_steps = steps
        self._attach_reference_logprobs(train_rows + val_rows)

    def _attach_reference_logprobs(self, rows: list[dict[str, Any]]) -> None:
        """Store ln π_t(y|s_h), ln π_t(y'|s_h) in each row (in place), before any gradient step."""
        with self.accelerator.autocast():
            values = reference_logprobs(
                self.model, rows, self.pad_id, self.config.temperature, self.config.per_device_batch_size
            )
        for row, (ref_logp, ref_logp_prime) in zip(rows, values, strict=True):
            row["ref_logp"], row["ref_logp_prime"] = ref_logp, ref_logp_prime

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_pairs(rows, self.pad_id)

    def _pair_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, relative log-ratio ``[B]`` and relative reward ``[B]`` of a batch of pairs."""
        logp = masked_sequence_logprobs(
            self.model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], self.config.temperature
        )  # [2B]
        logp_y, logp_y_prime = torch.tensor_split(logp, 2)  # [B], [B]
        ref_y, ref_y_prime = torch.tensor_split(batch["ref_logp"].to(logp.dtype), 2)
        reward, reward_prime = torch.tensor_split(batch["reward"].to(logp.dtype), 2)
        loss = refuel_loss(logp_y, logp_y_prime, ref_y, ref_y_prime, reward, reward_prime, self.config.eta)
        return loss, (logp_y - ref_y) - (logp_y_prime - ref_y_prime), reward - reward_prime

    @torch.no_grad()
    def validate(self, split: str = "validation") -> ValidationMetrics:
        """REFUEL loss and sign agreement of the current policy on the ``"validation"`` or ``"train"`` pairs."""
        self.model.eval()
        losses, ratios, rewards = [], [], []
        for batch in self.eval_loaders[split]:
            loss, ratio, reward = self._pair_terms(batch)
            losses.append(loss.item() * len(ratio))
            ratios.append(ratio)
            rewards.append(reward)
        if not ratios:
            return ValidationMetrics(float("nan"), float("nan"))
        count = sum(len(r) for r in ratios)
        return ValidationMetrics(sum(losses) / count, sign_agreement(torch.cat(ratios), torch.cat(rewards)))

    def train(self) -> list[dict[str, float]]:
        """Run ``epochs`` passes of gradient steps; returns the per-optimizer-step log."""
        log: list[dict[str, float]] = []
        progress = tqdm(total=self.total_steps, desc="REFUEL steps", unit="step")
        for _ in range(self.config.epochs):
            self.model.train()
            for batch in self.train_loader:
                with self.accelerator.accumulate(self.model):
                    loss, _, _ = self._pair_terms(batch)
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients:
                        self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                if self.accelerator.sync_gradients:
                    log.append({"loss": loss.item(), "lr": self.scheduler.get_last_lr()[0]})
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss.item():.4f}")
        progress.close()
        return log

    def save(self, folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        """Write π_{t+1} as a ``save_pretrained`` folder, atomically (staging folder, then rename)."""
        save_pretrained_atomic(self.accelerator.unwrap_model(self.model), tokenizer, folder)


def save_pretrained_atomic(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """``save_pretrained`` model and tokenizer into ``folder`` so that it appears complete or not at all."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
