"""The prompt row: one UltraInteract-format prompt that starts a dialogue."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptRow:
    """One prompt in UltraInteract's format.

    Attributes:
        id: unique row id (UltraInteract's ``id``, or the shared file's sha256 id).
        task: UltraInteract task, e.g. ``"Math_CoT"``, ``"Coding"``, ``"Logic"``.
        dataset: source dataset, e.g. ``"gsm8k"``, ``"MATH"``, ``"mbpp"``.
        instruction: the first user message of the dialogue.
        reference: gold final answer (Math), test code (Coding) or answer span (Logic); ``None``
            when the source has none (hub ``_pair`` / ``_sft`` rows).
        split: source split (``"train"``, ``"test"``, ...), ``""`` when unknown.
        meta: any further source fields, e.g. ``source_solution`` for GSM8K.
    """

    id: str
    task: str
    dataset: str
    instruction: str
    reference: str | None = None
    split: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
