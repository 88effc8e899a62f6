"""Worker-side weight sync for vLLM engines, mixed into each worker through ``worker_extension_cls``.

vLLM imports this module inside its worker processes; methods defined here are called by name with
``LLM.collective_rpc``. Keep it free of heavy imports.
"""

from __future__ import annotations

from typing import Any


class WeightSyncExtension:
    """Adds :meth:`load_policy_weights` to a vLLM worker (``self`` is the worker)."""

    def load_policy_weights(self, folder: str) -> None:
        """Reload the model's weights in place from a ``save_pretrained`` folder (safetensors).

        vLLM's in-place reload processes a tied parameter only through its first owner
        (``embed_tokens``), so an output layer tied to the embeddings keeps kernel data derived from
        the old weights (on CPU: the packed GEMM weight of ``lm_head``). Its post-load processing is
        therefore run again here.
        """
        worker: Any = self
        worker.reload_weights(weights_path=folder)
        model = worker.get_model()
        head = getattr(model, "lm_head", None)
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)
