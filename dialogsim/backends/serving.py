"""One engine serving a sequence of policies that share an architecture, by live weight sync."""

from __future__ import annotations

import time
from typing import Any

from transformers import AutoConfig

from dialogsim.backends.base import WeightSyncBackend
from dialogsim.backends.factory import build_backend
from dialogsim.models import resolve_model

# Config fields that fix the shapes of a causal LM's weights; policies equal on them can swap weights.
SHAPE_FIELDS = (
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


def architecture(policy: str) -> dict[str, Any]:
    """The :data:`SHAPE_FIELDS` of a policy's ``config.json`` (name, folder or hub id)."""
    config = AutoConfig.from_pretrained(resolve_model(policy)).to_dict()
    return {name: config.get(name) for name in SHAPE_FIELDS}


class ServingEngine:
    """Starts a policy engine for the first policy served, then swaps in each next policy's weights.

    A policy of another architecture (see :data:`SHAPE_FIELDS`) gets a new engine in place of the old.

    Successive policies π_0, π_1, ... of a training run, or the candidates of an evaluation that were
    all fine-tuned from one base model, differ only in their weights. Starting a vLLM engine costs
    20–50 s on a CPU (minutes for an 8B model on GPUs), while loading new weights into the running one
    takes under a second (:meth:`~dialogsim.backends.base.WeightSyncBackend.load_weights`).

    Args:
        kind: ``"transformers"`` or ``"vllm"`` (an ``"openai"`` server cannot load weights).
        kv_cache_gib / tensor_parallel_size: vLLM engine settings (see
            :func:`~dialogsim.backends.factory.build_backend`).

    Raises:
        ValueError: ``kind`` is not an engine that can load weights.
    """

    SYNCABLE = ("transformers", "vllm")

    def __init__(self, kind: str, *, kv_cache_gib: float = 4.0, tensor_parallel_size: int = 1) -> None:
        if kind not in self.SYNCABLE:
            raise ValueError(
                f"policy backend {kind!r} cannot load a policy's weights; choose one of {', '.join(self.SYNCABLE)}"
            )
        self.kind, self.kv_cache_gib, self.tensor_parallel_size = kind, kv_cache_gib, tensor_parallel_size
        self.backend: WeightSyncBackend | None = None
        self.architecture: dict[str, Any] = {}

    def serve(self, policy_path: str, stats: dict[str, Any] | None = None) -> WeightSyncBackend:
        """The engine with the weights of ``policy_path`` (embedded name, folder or hub id).

        Records ``engine_start_seconds`` (a new engine) or ``weight_sync_seconds`` (new weights in the
        running engine) in ``stats`` when given. Serving the policy already loaded costs nothing.

        Raises:
            OSError: ``policy_path`` holds no model config or no loadable weights.
        """
        stats = {} if stats is None else stats
        if self.backend is not None and self.backend.name == policy_path:
            return self.backend
        started = time.perf_counter()
        shapes = architecture(policy_path)
        if self.backend is None or shapes != self.architecture:
            self.backend, self.architecture = None, shapes  # drop the old engine before starting one
            self.backend = build_backend(
                self.kind,
                policy_path,
                kv_cache_gib=self.kv_cache_gib,
                tensor_parallel_size=self.tensor_parallel_size,
            )
            stats["engine_start_seconds"] = time.perf_counter() - started
        else:
            stats["weight_sync_seconds"] = self.backend.load_weights(resolve_model(policy_path))
        return self.backend
