"""Any ``transformers`` sequence-classification reward model (ArmoRM / Skywork / FsfairX style)."""

from __future__ import annotations

from collections import Counter

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch


class SequenceClassificationReward:
    """Scores a dialogue with a reward model's scalar head, through the model's own chat template.

    Each dialogue is rendered with ``tokenizer.apply_chat_template(dialogue, tokenize=False)`` and
    tokenised without adding special tokens again (the template already holds them). Batches are
    right-padded with the model's ``config.pad_token_id`` (set, when missing, to the tokenizer's pad
    token or else its EOS token), so positions stay those of the unpadded sequence and the model's
    head pools the last non-pad token, as ``*ForSequenceClassification`` models do. The reward is
    ``output.score[:, 0]`` when the output has a ``score`` field (ArmoRM's custom head), else
    ``output.logits[:, 0]``: the model's raw scale (e.g. ArmoRM ≈ [-0.1, 0.3], Skywork ≈ [-30, 30]).

    NaN, with the reason counted in :attr:`failures`: ``"too_long"`` when the rendered dialogue has
    more than ``max_length`` tokens.

    Args:
        model_name_or_path: Hugging Face id or local folder of a ``*ForSequenceClassification`` model
            whose tokenizer has a chat template.
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        dtype: weight dtype (``torch.bfloat16`` on GPU for 8B models).
        batch_size: dialogues per forward pass.
        max_length: longest dialogue in tokens that is scored.
        trust_remote_code: allow the model's own code from the hub (needed by ArmoRM).

    Raises:
        ValueError: the tokenizer has no chat template, or neither model nor tokenizer names a pad or
            EOS token.
    """

    def __init__(
        self,
        model_name_or_path: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        max_length: int = 4096,
        trust_remote_code: bool = False,
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"SequenceClassificationReward: the tokenizer of {model_name_or_path!r} has no chat_template; "
                "use a reward model that ships one or set tokenizer.chat_template in its tokenizer_config.json"
            )
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        self.model.to(device).eval()
        if self.model.config.pad_token_id is None:
            fallback = self.tokenizer.pad_token_id
            self.model.config.pad_token_id = self.tokenizer.eos_token_id if fallback is None else fallback
        if self.model.config.pad_token_id is None:
            raise ValueError(
                f"SequenceClassificationReward: {model_name_or_path!r} defines no pad or eos token; "
                "set pad_token_id in its config.json"
            )
        self.pad_token_id: int = self.model.config.pad_token_id
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.failures: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per dialogue; ``rows`` are not used (the model judges the dialogue alone).

        Raises:
            ValueError: ``dialogues`` and ``rows`` differ in length.
        """
        check_batch(dialogues, rows, "SequenceClassificationReward")
        token_ids = [self.tokenize(dialogue) for dialogue in dialogues]
        rewards = [float("nan")] * len(dialogues)
        fitting = [index for index, ids in enumerate(token_ids) if len(ids) <= self.max_length]
        if len(fitting) < len(dialogues):
            self.failures["too_long"] += len(dialogues) - len(fitting)
        for start in range(0, len(fitting), self.batch_size):
            batch = fitting[start : start + self.batch_size]
            for index, value in zip(batch, self._forward([token_ids[i] for i in batch]), strict=True):
                rewards[index] = value
        return rewards

    def tokenize(self, dialogue: list[Message]) -> list[int]:
        """Token ids of the dialogue rendered with the model's chat template."""
        text = self.tokenizer.apply_chat_template(dialogue, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def _forward(self, token_ids: list[list[int]]) -> list[float]:
        longest = max(len(ids) for ids in token_ids)
        input_ids = torch.tensor([ids + [self.pad_token_id] * (longest - len(ids)) for ids in token_ids])  # [B, T]
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in token_ids])  # [B, T]
        output = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        scores = getattr(output, "score", None)
        scores = output.logits if scores is None else scores  # [B, labels] (ArmoRM score: [B, 1] or [B])
        if scores.dim() > 1:
            scores = scores[:, 0]
        return scores.float().cpu().tolist()
