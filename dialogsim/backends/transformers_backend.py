"""Batched chat generation with a ``transformers`` causal LM (the portable CPU default)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TopPLogitsWarper,
)

from dialogsim.backends.base import Completion
from dialogsim.messages import Message
from dialogsim.models import resolve_model
from dialogsim.precision import Hardware, engine_dtype
from dialogsim.sampling import SEED_LIMIT, SamplingParams


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
        dtype: the ``engine_dtype`` setting (``auto`` | ``float32`` | ``bfloat16`` | ``float16``), decided for
            ``device`` by :func:`dialogsim.precision.engine_dtype` (``auto``: bf16 only where it is native).
        device: torch device string.
        batch_size: conversations per ``generate`` call; larger batches are split.

    Each conversation is sampled with its own seed (``sampling.seeds``, or derived from
    ``sampling.seed``; unseeded calls draw the seeds from the global torch RNG, seeded ones leave it
    untouched) by :class:`PerRowSampling` inside greedy ``generate``: a row's reply depends only on
    its conversation, its seed and the settings, not on the rest of the batch or ``batch_size``, up to
    the floating-point effect of left padding and batch shape on the logits. Measured on SmolLM2-135M
    (8 GSM8K student-template prompts, 32-token replies, alone vs in one batch of 8): float32 gave
    8/8 identical replies at temperature 1.0 and 0.01; bfloat16 gave 4/8 (temperature 1.0) and 2/8
    (0.01), the others first differing after 2 to 30 tokens, where a near-tie flipped. Identical rows
    of one batch draw identical replies in either dtype.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "auto",
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.name = model_name_or_path
        self.precision = engine_dtype(dtype, Hardware.detect(device))
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            resolve_model(model_name_or_path), dtype=self.precision.torch_dtype
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
        """Generate one reply per conversation (see :class:`~dialogsim.backends.base.ChatBackend`).

        Raises:
            ValueError: ``sampling.seeds`` does not hold one seed per conversation.
        """
        seeds = sampling.conversation_seeds(len(conversations))
        if seeds is None:
            seeds = torch.randint(SEED_LIMIT, (len(conversations),)).tolist()
        completions: list[Completion] = []
        for start in range(0, len(conversations), self.batch_size):
            end = start + self.batch_size
            completions += self._generate(conversations[start:end], sampling.with_seeds(seeds[start:end]))
        return completions

    @torch.inference_mode()
    def _generate(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        """One ``generate`` call; ``sampling.seeds`` holds one seed per conversation."""
        prompts = [chat_prompt_ids(self.tokenizer, conversation) for conversation in conversations]
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        width = batch["input_ids"].shape[1]
        sampler = PerRowSampling(sampling, [width - len(prompt) for prompt in prompts], self.device)
        output = self.model.generate(
            **batch,
            do_sample=False,  # greedy over PerRowSampling's scores is sampling, one generator per row
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=None,
            logits_processor=LogitsProcessorList([sampler]),
            max_new_tokens=sampling.max_new_tokens,
            stop_strings=list(sampling.stop) or None,
            tokenizer=self.tokenizer if sampling.stop else None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        generated = output[:, width:].tolist()  # [batch, new_tokens]
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


class PerRowSampling(LogitsProcessor):
    """Sampling with one ``torch.Generator`` per row, as the last logits processor of greedy ``generate``.

    At each step, for each row i of the ``[batch, vocab]`` scores (float32 in ``generate``):

    1. the repetition penalty on row i's own prompt and generated tokens, its left padding excluded
       (``transformers``' ``RepetitionPenaltyLogitsProcessor`` on the row's unpadded ids);
    2. when ``temperature > 0``: scores / temperature, nucleus filtering (``TopPLogitsWarper``), then
       plus Gumbel noise ``-log E``, ``E ~ Exp(1)`` of shape ``[vocab]`` drawn from row i's generator.

    Greedy decoding's argmax is then a sample of the top-p-truncated ``softmax(scores / temperature)``
    (the Gumbel-max trick; vLLM's sampler draws the same way, ``argmax(p / E)``, with per-request
    generators). Row i draws one noise vector per step from its own generator, so its reply depends
    only on its seed, its ids and its own logits. ``transformers``' batched sampling instead shares
    one generator across the batch, and its repetition penalty also counts the left padding.

    Args:
        sampling: ``temperature``, ``top_p``, ``repetition_penalty`` and ``seeds`` (one per row).
        padding: left-padding length of each row ``[batch]`` (tokens).
        device: device of the scores, where the generators live.

    Raises:
        ValueError: ``sampling.seeds`` does not hold one seed per row.
    """

    def __init__(self, sampling: SamplingParams, padding: list[int], device: str | torch.device) -> None:
        seeds = sampling.conversation_seeds(len(padding))
        if seeds is None:
            raise ValueError("PerRowSampling needs one seed per row: pass sampling.with_seeds([...])")
        self.temperature = sampling.temperature
        self.padding = padding
        self.penalty = (
            RepetitionPenaltyLogitsProcessor(float(sampling.repetition_penalty))
            if sampling.repetition_penalty != 1.0
            else None
        )
        self.top_p = TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1.0 else None
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Processed scores ``[batch, vocab]`` of the next token, given ``input_ids`` ``[batch, width]``."""
        if self.penalty is not None:
            scores = torch.cat(
                [self.penalty(input_ids[i : i + 1, pad:], scores[i : i + 1]) for i, pad in enumerate(self.padding)]
            )
        if self.temperature == 0:
            return scores
        scores = scores / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        vocab = scores.shape[-1]
        exponential = torch.stack(
            [
                torch.empty(vocab, dtype=scores.dtype, device=scores.device).exponential_(generator=generator)
                for generator in self.generators
            ]
        )  # [batch, vocab]
        return scores - exponential.log()
