"""Sampling settings that travel as one value, in the manner of vLLM's ``SamplingParams``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class SamplingParams:
    """How a backend samples one reply per conversation.

    Attributes:
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus-sampling mass in (0, 1].
        max_new_tokens: cap on generated tokens per reply (tokens).
        repetition_penalty: CTRL-style penalty (1.0 = off), as in ``transformers`` generation.
        stop: strings that end the reply early; the text is cut right after the first one, which is
            kept (vLLM's ``include_stop_str_in_output=True``).
        seed: seed of the sampling RNG for this call; ``None`` draws from the global RNG.
    """

    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def with_seed(self, seed: int | None) -> SamplingParams:
        """A copy of these settings with another seed."""
        return replace(self, seed=seed)
