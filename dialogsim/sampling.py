"""Sampling settings that travel as one value, in the manner of vLLM's ``SamplingParams``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

from dialogsim.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range, check_settings, setting

SEED_LIMIT = 2**31
"""Seeds of single conversations lie in ``[0, SEED_LIMIT)``: every engine and OpenAI-compatible server takes them."""


def request_seed(seed: int, index: int) -> int:
    """Seed of conversation ``index`` of a call seeded with ``seed`` (one value, see :attr:`SamplingParams.seed`).

    A hash (not ``seed + index``), so that call seeds 0 and 1 do not share seeds across
    conversations. The value is in ``[0, SEED_LIMIT)``.
    """
    digest = hashlib.sha256(f"dialogsim/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


@dataclass(frozen=True)
class SamplingParams:
    """How a backend samples one reply per conversation.

    Attributes:
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus-sampling mass in (0, 1].
        max_new_tokens: cap on generated tokens per reply (tokens); the default is the commands' policy cap.
        repetition_penalty: CTRL-style penalty (1.0 = off, > 0), as in ``transformers`` generation.
        stop: strings that end the reply early; the text is cut right after the first one, which is
            kept (vLLM's ``include_stop_str_in_output=True``).
        seed: one seed for the whole call: conversation i is sampled with :func:`request_seed`
            (``seed``, i), so a call is reproducible for the same batch; ``None`` (and no ``seeds``)
            draws from the global RNG.
        seeds: one seed per conversation of the call, each in ``[0, SEED_LIMIT)`` (vLLM's per-request
            ``SamplingParams.seed``): conversation i's reply depends only on (conversation i,
            ``seeds[i]``) and these settings, not on the other conversations of the call (up to the
            batch's floating-point numerics, see each backend). Common random numbers: two copies of
            a dialogue with the same seed draw the same sample. Exclusive with ``seed``.

    The defaults of ``temperature``, ``top_p`` and ``max_new_tokens`` are the commands' policy sampling
    (``refuel.config.SamplingConfig`` takes these fields over with :func:`~dialogsim.settings.same_as`).

    Raises:
        ValueError: a setting of the wrong type or out of range (:func:`~dialogsim.settings.check_settings`, a
            ``UsageError``), both ``seed`` and ``seeds``, or a seed of ``seeds``
            outside ``[0, SEED_LIMIT)``.
    """

    temperature: float = setting(
        0.8,
        help="sampling temperature; 0 is greedy (paper: 0.8 for the policy)",
        shapes="dialogues",
        valid=NON_NEGATIVE,
    )
    top_p: float = setting(1.0, help="nucleus sampling mass", shapes="dialogues", valid=Range(0, 1, low_open=True))
    max_new_tokens: int = setting(160, help="cap on reply tokens (paper: 1024)", shapes="dialogues", valid=AT_LEAST_ONE)
    repetition_penalty: float = setting(
        1.0, help="CTRL-style repetition penalty (1 = off)", shapes="dialogues", valid=POSITIVE
    )
    stop: tuple[str, ...] = setting(default_factory=tuple, help="strings that end a reply (kept)", shapes="dialogues")
    seed: int | None = setting(None, help="one seed for the call", shapes="dialogues", valid=NON_NEGATIVE)
    seeds: tuple[int, ...] | None = setting(None, help="one seed per conversation", shapes="dialogues")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.seed is not None and self.seeds is not None:
            raise ValueError(
                "SamplingParams takes seed (one for the call) or seeds (one per conversation), not both; "
                "use with_seed or with_seeds, which clear the other"
            )
        for index, seed in enumerate(self.seeds or ()):
            if not 0 <= seed < SEED_LIMIT:
                raise ValueError(f"SamplingParams.seeds[{index}] must be in [0, 2**31), got {seed}")

    def with_seed(self, seed: int | None) -> SamplingParams:
        """A copy of these settings with one seed for the call (and no per-conversation ``seeds``)."""
        return replace(self, seed=seed, seeds=None)

    def with_seeds(self, seeds: Sequence[int]) -> SamplingParams:
        """A copy of these settings with one seed per conversation (and no call ``seed``)."""
        return replace(self, seed=None, seeds=tuple(int(seed) for seed in seeds))

    def conversation_seeds(self, n_conversations: int) -> list[int] | None:
        """The seed of each conversation of a call with ``n_conversations``: ``seeds``, else derived from ``seed``.

        Returns:
            ``list(seeds)``; else ``[request_seed(seed, i) for i in range(n_conversations)]``; else
            ``None`` (unseeded).

        Raises:
            ValueError: ``seeds`` does not hold exactly one seed per conversation.
        """
        if self.seeds is not None:
            if len(self.seeds) != n_conversations:
                raise ValueError(
                    f"SamplingParams.seeds holds {len(self.seeds)} seeds for a call with {n_conversations} "
                    "conversations; give one seed per conversation"
                )
            return list(self.seeds)
        if self.seed is None:
            return None
        return [request_seed(self.seed, index) for index in range(n_conversations)]
