"""Any ``transformers`` sequence-classification reward model (ArmoRM / Skywork / FsfairX style)."""

from __future__ import annotations

import itertools
from collections import Counter

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dialogsim.messages import Message
from dialogsim.precision import Hardware, engine_dtype
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch


class SequenceClassificationReward:
    """Scores a dialogue with a reward model's scalar head, through the model's own chat template.

    Each dialogue is rendered with ``tokenizer.apply_chat_template(dialogue, tokenize=False)`` (or the
    ``chat_template`` given here) and tokenised without adding special tokens again (the template
    already holds them). Batches are right-padded with a token id that occurs in none of the batch's
    dialogues (the model's pad id whenever it can be), set as ``config.pad_token_id`` for that forward
    pass. Both ways reward heads find the last token then read the last real token: ``transformers``'
    ``*ForSequenceClassification`` pools the rightmost non-pad token, ArmoRM's custom head pools the
    token before the first pad. (Padding with a pad id that also occurs inside a dialogue, e.g. pad =
    EOS = the end-of-turn token, would make ArmoRM pool at the end of the first message.)

    The reward is read from the model output (see :func:`reward_values`): ``output.score`` when present
    (ArmoRM's custom head), else ``output.logits``, first column: the model's raw scale (e.g. ArmoRM
    ≈ [-0.1, 0.3], Skywork ≈ [-30, 30]).

    NaN, with the reason counted in :attr:`failures`: ``"too_long"`` when the rendered dialogue has
    more than ``max_length`` tokens.

    Args:
        model_name_or_path: Hugging Face id or local folder of a ``*ForSequenceClassification`` model
            (or one with custom code mapped to ``AutoModelForSequenceClassification``).
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        dtype: the ``engine_dtype`` setting, decided for ``device`` by :func:`dialogsim.precision.engine_dtype`
            (role ``scoring``; ``auto``: bf16 on GPUs with bf16, float32 on CPUs).
        batch_size: dialogues per forward pass.
        max_length: longest dialogue in tokens that is scored.
        trust_remote_code: allow the model's own code from the hub (needed by ArmoRM); only set it for
            models whose code you trust.
        chat_template: Jinja chat template to use instead of the tokenizer's (for reward models whose
            tokenizer ships none); ``None`` keeps the tokenizer's.

    Raises:
        ValueError: the tokenizer has no chat template and none is given; or weights of the loaded model are
            missing from the checkpoint (e.g. ArmoRM without ``trust_remote_code``: ``transformers`` would
            silently build a generic Llama head with a random ``score`` layer).
    """

    def __init__(
        self,
        model_name_or_path: str,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 8,
        max_length: int = 4096,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"SequenceClassificationReward: the tokenizer of {model_name_or_path!r} has no chat_template; "
                "use a reward model that ships one, or pass chat_template= the template it was trained with"
            )
        self.model, loading = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path,
            dtype=engine_dtype(dtype, Hardware.detect(device), role="scoring").torch_dtype,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
        if loading["missing_keys"]:
            raise ValueError(
                f"SequenceClassificationReward: {model_name_or_path!r} loaded as {type(self.model).__name__} but the "
                f"checkpoint lacks {sorted(loading['missing_keys'])[:5]}, which would be random weights. A reward "
                "model with its own head code (ArmoRM) needs trust_remote_code=True (refuel-evaluate: "
                "--trust_remote_code) if you trust that code; otherwise pass a sequence-classification reward model"
            )
        self.model.to(device).eval()
        self.preferred_pad_ids = [
            token_id
            for token_id in (self.model.config.pad_token_id, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
            if token_id is not None
        ]
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

    def padding_id(self, token_ids: list[list[int]]) -> int:
        """A token id absent from every sequence of the batch: the first such preferred id, else the smallest."""
        used = set().union(*token_ids)
        return next(i for i in itertools.chain(self.preferred_pad_ids, itertools.count()) if i not in used)

    @torch.inference_mode()
    def _forward(self, token_ids: list[list[int]]) -> list[float]:
        pad = self.padding_id(token_ids)
        longest = max(len(ids) for ids in token_ids)
        input_ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids in token_ids])  # [B, T]
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in token_ids])  # [B, T]
        configs = {id(c): c for c in (self.model.config, self.model.config.get_text_config())}.values()
        saved = [config.pad_token_id for config in configs]
        for config in configs:
            config.pad_token_id = pad  # heads read it to find each sequence's last token
        try:
            output = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        finally:
            for config, value in zip(configs, saved, strict=True):
                config.pad_token_id = value
        return reward_values(output).float().cpu().tolist()


def reward_values(output: object) -> torch.Tensor:
    """The scalar reward per sequence ``[B]`` from a reward model's forward output.

    Reads ``output.score`` when the output has it (ArmoRM-style custom heads: ``[B]`` or ``[B, 1]``),
    else ``output.logits`` (``transformers`` heads: ``[B, num_labels]``), else the first element of a
    tuple output; from a 2-D tensor the first column (label 0) is the reward.

    Raises:
        TypeError: the output holds no tensor in any of these places; the message names the output's type.
    """
    values = getattr(output, "score", None)
    if not isinstance(values, torch.Tensor):
        values = getattr(output, "logits", None)
    if not isinstance(values, torch.Tensor) and isinstance(output, tuple) and output:
        values = output[0]
    if not isinstance(values, torch.Tensor):
        raise TypeError(
            f"reward model returned {type(output).__name__} without a 'score' or 'logits' tensor; "
            "use a sequence-classification reward model or one whose output has a 'score' field"
        )
    return values[:, 0] if values.dim() > 1 else values
