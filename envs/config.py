"""The simulator's settings: which prompts, which simulated user, which reward, which engines.

Small dataclasses that every command composes into its own configuration (``refuel-train``'s
:class:`~refuel.config.RefuelConfig`, ``refuel-evaluate``'s :class:`~refuel.config.EvaluateConfig`), and that
:func:`envs.build.build_simulator` takes (so ``gym.make`` keyword arguments are these fields). Each field's default,
range, help line and fingerprint membership are declared once, on the field (:func:`dialogsim.settings.setting`);
:class:`SimulatorConfig` checks itself when it is built, so a ``gym.make`` value out of range is refused before
anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

from dialogsim.data import PromptConfig
from dialogsim.models import DEFAULT_MODEL
from dialogsim.precision import EngineDtype
from dialogsim.settings import AT_LEAST_ONE, POSITIVE, Rule, field_names, same_as, setting
from dialogsim.simulator import EpisodeConfig

PolicyBackend = Literal["transformers", "vllm"]
UserBackend = Literal["auto", "transformers", "vllm", "openai"]


@dataclass
class UserConfig:
    """The simulated user and the dialogue's token budget."""

    user_model: str = setting(
        DEFAULT_MODEL, help="simulated-user model (fixed): name, folder or hub id", shapes="dialogues"
    )
    user_template: Literal["student", "paper", "replay"] = setting(
        "student",
        help="user prompt: student (small models) | paper (the REFUEL paper's) | replay (no user model: each row's "
        "scripted follow-ups, meta.follow_ups)",
        shapes="dialogues",
    )
    max_dialogue_tokens: int = same_as(EpisodeConfig, "max_dialogue_tokens")


@dataclass
class RewardConfig:
    """The reward model that scores finished dialogues (:func:`dialogsim.rewards.factory.build_reward_model`)."""

    reward: str = setting(
        "math",
        help="math (verifier + MiniLM) | math_format | turn_answer (per-turn references) | code | verifier | none | "
        "a sequence-classification RM id/path | package.module:name or an installed plugin's name: a reward of "
        "your own (README 'Your own reward')",
        shapes="pairs",
    )
    trust_remote_code: bool = setting(
        False, help="let a hub reward model run its own code (ArmoRM needs it)", shapes="pairs"
    )


@dataclass
class EngineConfig:
    """The engine that generates the policy's replies (and loads π_t's weights live), and the precision of
    every model run for inference (:func:`dialogsim.precision.engine_dtype`)."""

    backend: PolicyBackend = setting(
        "transformers",
        help="policy engine: transformers | vllm (one engine; π_t's or a later policy's weights are loaded into it)",
        shapes="dialogues",
    )
    engine_dtype: EngineDtype = setting(
        "auto",
        help="precision of every inference engine (policy, user, judge, reward models): auto (bf16 where the "
        "processor has bf16 instructions or CUDA bf16, else float32) | float32 | bfloat16 | float16; "
        "training stays float32",
        shapes="dialogues",
    )


@dataclass
class UserEngineConfig:
    """The engine of the simulated user."""

    user_backend: UserBackend = setting(
        "auto",
        help="simulated-user engine: auto (the policy's; on vllm the user shares the policy's engine when its model "
        "has the policy's architecture, weights swapped per call) | transformers | vllm (an engine of its own) "
        "| openai (a server)",
        shapes="dialogues",
    )
    user_base_url: str | None = setting(
        None, help="OpenAI-compatible server of the user model (user_backend=openai)", shapes=None
    )


@dataclass
class VLLMConfig:
    """vLLM's resources per engine (no effect on what is generated)."""

    vllm_kv_cache_gib: float = setting(
        4.0, help="vLLM KV-cache space per engine on CPU (GiB)", shapes=None, valid=POSITIVE
    )
    vllm_tensor_parallel_size: int = setting(
        1, help="vLLM tensor-parallel GPUs per engine", shapes=None, valid=AT_LEAST_ONE
    )


def is_http_url(text: str | None) -> bool:
    """Whether ``text`` is an http(s) URL with a host, e.g. ``http://127.0.0.1:8000/v1``."""
    url = urlparse(text or "")
    return url.scheme in ("http", "https") and bool(url.netloc)


SIMULATOR_RULES = (
    Rule(
        ("user_base_url", "user_backend"),
        lambda c: c.user_backend != "openai" or is_http_url(c.user_base_url),
        "the server's http(s) URL with --user_backend openai, e.g. http://127.0.0.1:8000/v1",
    ),
)


@dataclass
class SimulatorConfig(PromptConfig, UserConfig, RewardConfig, EngineConfig, UserEngineConfig, VLLMConfig):
    """Everything :func:`envs.build.build_simulator` loads by name: prompts, simulated user, reward, engines.

    Raises:
        UsageError: (a ``ValueError``) when built, a field of the wrong type or out of its range, or a user server
            without an http(s) URL (:data:`SIMULATOR_RULES`), naming each one and what is valid.
    """

    rules = SIMULATOR_RULES

    def simulator_settings(self) -> dict[str, Any]:
        """This config's :class:`SimulatorConfig` fields only (a command's config has more)."""
        return {name: getattr(self, name) for name in field_names(SimulatorConfig)}
