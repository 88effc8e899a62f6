"""Batched chat generation with a ``transformers`` causal LM (the portable CPU default)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dialogsim.backends.base import Completion
from dialogsim.messages import Message
from dialogsim.models import resolve_model
from dialogsim.sampling import SamplingParams


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Tokenizer of a model name or path, with a pad token (falls back to EOS).

    Raises:
        ValueError: the tokenizer has no chat template, so dialogues cannot be rendered.
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer of {name_or_path!r} has no chat template; use an instruction-tuned chat model")
    return tokenizer


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template with the assistant generation prompt."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


class TransformersBackend:
    """:class:`~dialogsim.backends.base.ChatBackend` on ``model.generate`` with left padding.

    Args:
        model_name_or_path: embedded model name (``smollm2-135m-instruct``), local folder or hub id.
        dtype: weights dtype for generation; bfloat16 is fast on CPUs with AMX.
        device: torch device string.
        batch_size: conversations per ``generate`` call; larger batches are split.

    One ``chat`` call samples one reply per conversation, seeded by ``sampling.seed`` (the global
    torch RNG is left untouched). Outputs depend on the batch composition through padding, as in
    any batched engine.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: torch.dtype = torch.bfloat16,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.name = model_name_or_path
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            resolve_model(model_name_or_path), dtype=dtype
        ).to(device)
        self.model.eval()
        self.device = device
        self.batch_size = batch_size

    def load_weights(self, folder: str | Path) -> float:
        """Replace the model's weights with those of a ``save_pretrained`` folder (same architecture).

        Returns:
            Wall time of the load (seconds).

        Raises:
            OSError: ``folder`` holds no loadable model.
            RuntimeError: the folder's parameters do not match this model's (another architecture).
        """
        started = time.perf_counter()
        trained = AutoModelForCausalLM.from_pretrained(folder, dtype=self.model.dtype)
        self.model.load_state_dict(trained.state_dict())
        self.name = str(folder)
        return time.perf_counter() - started

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        """Generate one reply per conversation (see :class:`~dialogsim.backends.base.ChatBackend`)."""
        completions: list[Completion] = []
        with torch.random.fork_rng(devices=[]):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(conversations), self.batch_size):
                completions += self._generate(conversations[start : start + self.batch_size], sampling)
        return completions

    @torch.inference_mode()
    def _generate(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        prompts = [chat_prompt_ids(self.tokenizer, conversation) for conversation in conversations]
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        sampled = sampling.temperature > 0
        output = self.model.generate(
            **batch,
            do_sample=sampled,
            temperature=sampling.temperature if sampled else None,
            top_p=sampling.top_p if sampled else None,
            top_k=None,
            max_new_tokens=sampling.max_new_tokens,
            repetition_penalty=sampling.repetition_penalty,
            stop_strings=list(sampling.stop) or None,
            tokenizer=self.tokenizer if sampling.stop else None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        generated = output[:, batch["input_ids"].shape[1] :].tolist()  # [batch, new_tokens]
        return [self._completion(prompt, ids, sampling) for prompt, ids in zip(prompts, generated, strict=True)]

    def _completion(self, prompt: list[int], ids: list[int], sampling: SamplingParams) -> Completion:
        eos_ids = self._eos_ids()
        end = next((i + 1 for i, token in enumerate(ids) if token in eos_ids), None)
        stop_end = self._stop_string_end(ids[: end or len(ids)], sampling.stop)
        if stop_end is not None:
            end = stop_end  # what follows a stop string is padding, even when pad == EOS
        ids = ids[:end] if end is not None else ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) + len(s) for s in sampling.stop if s in text), default=len(text))
        return Completion(
            text=text[:cut],
            token_ids=tuple(ids),
            prompt_token_ids=tuple(prompt),
            finish_reason="stop" if end is not None else "length",
        )

    def _stop_string_end(self, ids: list[int], stop: tuple[str, ...]) -> int | None:
        """Number of leading ids whose text first contains a stop string (``None`` if none does)."""
        if not stop or not any(s in self.tokenizer.decode(ids, skip_special_tokens=True) for s in stop):
            return None
        return next(
            k
            for k in range(1, len(ids) + 1)
            if any(s in self.tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stop)
        )

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos) if isinstance(eos, list) else {eos}
        return eos_ids | {self.tokenizer.eos_token_id}
