"""One engine serving a sequence of policies that share an architecture, by live weight sync.

It can also serve several models in turn, each through its own :class:`EngineRole` (a policy and the
simulated user on one vLLM engine, see :func:`user_engine`): each call first swaps the role's weights in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from transformers import AutoConfig

from dialogsim.backends.base import ChatBackend, Completion, WeightSyncBackend
from dialogsim.backends.factory import BACKENDS, build_backend
from dialogsim.messages import Message
from dialogsim.models import resolve_model
from dialogsim.sampling import SamplingParams

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
        dtype: the ``engine_dtype`` setting of every engine it starts (see
            :func:`~dialogsim.backends.factory.build_backend`).
        kv_cache_gib / tensor_parallel_size: vLLM engine settings (see
            :func:`~dialogsim.backends.factory.build_backend`).

    Raises:
        ValueError: ``kind`` is not an engine that can load weights.
    """

    SYNCABLE = ("transformers", "vllm")

    def __init__(
        self, kind: str, *, dtype: str = "auto", kv_cache_gib: float = 4.0, tensor_parallel_size: int = 1
    ) -> None:
        if kind not in self.SYNCABLE:
            raise ValueError(
                f"policy backend {kind!r} cannot load a policy's weights; choose one of {', '.join(self.SYNCABLE)}"
            )
        self.kind, self.dtype = kind, dtype
        self.kv_cache_gib, self.tensor_parallel_size = kv_cache_gib, tensor_parallel_size
        self.backend: WeightSyncBackend | None = None
        self.architecture: dict[str, Any] = {}
        self.weight_syncs = 0  # live weight syncs so far (role swaps included)
        self.weight_sync_seconds = 0.0  # their total wall time (seconds)

    def load(self, policy_path: str) -> dict[str, float]:
        """Make the weights of ``policy_path`` (embedded name, folder or hub id) the engine's loaded ones.

        Returns:
            ``{"engine_start_seconds": s}`` when a new engine started, ``{"weight_sync_seconds": s}`` when
            new weights went into the running engine, ``{}`` when the policy was already loaded (it
            costs nothing).

        Raises:
            OSError: ``policy_path`` holds no model config or no loadable weights.
        """
        policy_path = resolve_model(policy_path)
        if self.backend is not None and self.backend.name == policy_path:
            return {}
        started = time.perf_counter()
        shapes = architecture(policy_path)
        if self.backend is None or shapes != self.architecture:
            self.backend, self.architecture = None, shapes  # drop the old engine before starting one
            self.backend = build_backend(
                self.kind,
                policy_path,
                dtype=self.dtype,
                kv_cache_gib=self.kv_cache_gib,
                tensor_parallel_size=self.tensor_parallel_size,
            )
            return {"engine_start_seconds": time.perf_counter() - started}
        seconds = self.backend.load_weights(policy_path)
        self.weight_syncs += 1
        self.weight_sync_seconds += seconds
        return {"weight_sync_seconds": seconds}

    def serve(self, policy_path: str) -> WeightSyncBackend:
        """The engine with the weights of ``policy_path`` loaded (started or synced by :meth:`load`).

        Raises:
            OSError: ``policy_path`` holds no model config or no loadable weights.
        """
        self.load(policy_path)
        assert self.backend is not None  # load started one
        return self.backend

    def role(self, model: str) -> EngineRole:
        """A :class:`~dialogsim.backends.base.ChatBackend` that generates with ``model``'s weights on this engine.

        Nothing is loaded until its first call; every call swaps ``model``'s weights in unless they are
        the ones loaded, so several roles (π_t and the simulated user, or π_0 and π_1 in an evaluation)
        can take turns on one engine. Give every role of a policy through this method, never the
        backend :meth:`serve` returned, which another role may have swapped out.
        """
        return EngineRole(self, resolve_model(model))


class EngineRole:
    """One model's turn on a shared :class:`ServingEngine` (see :meth:`ServingEngine.role`).

    Attributes:
        serving: the shared engine.
        name: the model's resolved name or folder (its weights are swapped in before each call).
    """

    def __init__(self, serving: ServingEngine, name: str) -> None:
        self.serving, self.name = serving, name

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        """Swap this role's weights in when another role's are loaded, then generate (see ``ChatBackend``)."""
        return self.serving.serve(self.name).chat(conversations, sampling)


def resolve_user_backend(user_backend: str, policy_backend: str) -> str:
    """The simulated user's engine kind: ``"auto"`` is the policy's (``policy_backend``), others stay.

    Raises:
        ValueError: ``user_backend`` is neither ``"auto"`` nor one of :data:`~dialogsim.backends.factory.BACKENDS`.
    """
    if user_backend == "auto":
        return policy_backend
    if user_backend not in BACKENDS:
        raise ValueError(f"unknown user_backend {user_backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    return user_backend


def user_engine(
    user_backend: str, policy: ServingEngine, policy_models: Sequence[str], user_model: str
) -> ChatBackend | None:
    """The simulated user's role on the policy's engine, or ``None`` when the user needs an engine of its own.

    With ``user_backend="auto"`` and a vLLM policy engine, a user model of the same architecture as
    every policy the engine will serve (see :data:`SHAPE_FIELDS`; e.g. the user and π_0 are both
    ``smollm2-135m-instruct``) runs on that engine as an :class:`EngineRole`: one engine on the CPU's
    cores instead of two, one engine start, and no weight swap while the policy has the user's weights
    (π_0). Once they differ (π_1, or a candidate in an evaluation) each switch between the roles is a
    live weight sync (under a second for SmolLM2-135M on CPU; README, roll-out speed). An explicit
    ``user_backend`` keeps an engine of its own, as does a user of another architecture.

    Args:
        user_backend: ``"auto"``, ``"transformers"``, ``"vllm"`` or ``"openai"``.
        policy: the policy's engine; serve its policies through :meth:`ServingEngine.role`.
        policy_models: every policy (name, folder or hub id) the engine will serve.
        user_model: the simulated user's model name, folder or hub id.
    """
    if user_backend != "auto" or policy.kind != "vllm":
        return None
    shapes = architecture(user_model)
    if any(architecture(model) != shapes for model in policy_models):
        return None
    return policy.role(user_model)
