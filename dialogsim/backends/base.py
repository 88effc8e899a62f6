"""The backend contract shared by every chat-generation engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from dialogsim.messages import Message
from dialogsim.sampling import SamplingParams


@dataclass(frozen=True)
class Completion:
    """One generated reply.

    Attributes:
        text: decoded reply without special tokens; a matched stop string is kept at its end and
            nothing after it.
        token_ids: generated token ids ``[n_generated]``, including the end-of-turn token when the
            model emitted it; no padding.
        prompt_token_ids: the chat-templated prompt ids ``[n_prompt]`` the reply was conditioned on.
        finish_reason: ``"stop"`` (end-of-turn token or stop string) or ``"length"`` (hit the cap).
        logprobs: per generated token log-probability in nats ``[n_generated]``, when the backend
            provides them.
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[float, ...] | None = None


@runtime_checkable
class ChatBackend(Protocol):
    """Generates one assistant reply for each conversation of a batch.

    ``conversations`` are lists of ``{"role", "content"}`` messages ending with a user message; they
    are rendered with the model's own chat template.
    """

    def chat(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[Completion]:
        """Return one :class:`Completion` per conversation, in order."""
        ...


@runtime_checkable
class WeightSyncBackend(ChatBackend, Protocol):
    """A backend whose engine takes new weights of the same architecture without restarting."""

    def load_weights(self, folder: str | Path) -> float:
        """Load a ``save_pretrained`` folder into the running engine; returns the sync time (seconds)."""
        ...
