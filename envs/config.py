"""The simulator's settings: which prompts, which simulated user, which reward.

Small dataclasses that every command composes into its own configuration (``refuel-train``'s
:class:`~refuel.config.RefuelConfig`, ``refuel-evaluate``'s :class:`~refuel.config.EvaluateConfig`), and that
:func:`envs.build.build_simulator` takes. A field name means one thing wherever it appears; its default and help
line are written once, here. What a run's fingerprints and an evaluation's cache key cover is derived from these
classes (:func:`field_names`), so a new field cannot silently drop out of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from dialogsim.models import DEFAULT_MODEL


def help_line(text: str) -> dict[str, str]:
    """``field(metadata=...)`` for a help line; ``%`` is escaped (argparse %-formats help strings)."""
    return {"help": text.replace("%", "%%")}


def field_names(*groups: type) -> tuple[str, ...]:
    """The field names of the dataclasses ``groups``, in order (each name once)."""
    return tuple(dict.fromkeys(spec.name for group in groups for spec in fields(group)))


@dataclass
class PromptConfig:
    """Which prompt rows a simulator runs on (:func:`dialogsim.data.load_prompts` and the held-out partition)."""

    prompts: str | None = field(
        default=None, metadata=help_line("prompt file (JSON Lines / Parquet) or hub id; default: the shared file")
    )
    tasks: list[str] | None = field(
        default_factory=lambda: ["Math_CoT"], metadata=help_line("UltraInteract tasks to keep ('all': every one)")
    )
    datasets: list[str] | None = field(
        default_factory=lambda: ["gsm8k"], metadata=help_line("source datasets to keep ('all': every one)")
    )
    splits: list[str] | None = field(
        default_factory=lambda: ["train"], metadata=help_line("source splits to keep ('all': every one)")
    )
    holdout: int = field(
        default=64,
        metadata=help_line(
            "prompts reserved for evaluation, never trained on (the same value in refuel-train and refuel-evaluate)"
        ),
    )
    max_prompt_tokens: int = field(default=384, metadata=help_line("drop prompts longer than this (tokens)"))


@dataclass
class UserConfig:
    """The simulated user and the dialogue's token budget."""

    user_model: str = field(
        default=DEFAULT_MODEL, metadata=help_line("simulated-user model (fixed): name, folder or hub id")
    )
    user_template: Literal["student", "paper", "replay"] = field(
        default="student",
        metadata=help_line(
            "user prompt: student (small models) | paper (the REFUEL paper's) | replay (no user model: each row's "
            "scripted follow-ups, meta.follow_ups)"
        ),
    )
    max_dialogue_tokens: int = field(
        default=2048, metadata=help_line("token budget per dialogue (tokens); a dialogue past it is truncated")
    )


@dataclass
class RewardConfig:
    """The reward model that scores finished dialogues (:func:`dialogsim.rewards.factory.build_reward_model`)."""

    reward: str = field(
        default="math",
        metadata=help_line(
            "math (verifier + MiniLM) | math_format | turn_answer (per-turn references) | code | verifier | none | "
            "a sequence-classification RM id/path | package.module:name or an installed plugin's name: a reward of "
            "your own (README 'Your own reward')"
        ),
    )
    trust_remote_code: bool = field(
        default=False, metadata=help_line("let a hub reward model run its own code (ArmoRM needs it)")
    )


@dataclass
class SimulatorConfig(PromptConfig, UserConfig, RewardConfig):
    """Everything :func:`envs.build.build_simulator` loads by name: prompts, simulated user, reward."""

    def simulator_settings(self) -> dict[str, Any]:
        """This config's :class:`SimulatorConfig` fields only (a command's config has more)."""
        return {name: getattr(self, name) for name in field_names(SimulatorConfig)}
