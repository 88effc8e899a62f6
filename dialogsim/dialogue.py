"""Dialogue state and its snapshot: everything needed to resume an episode at state s_h exactly."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from dialogsim.messages import Message, MessageFormatError, count_turns, validate_messages

SNAPSHOT_VERSION = 1


class SnapshotError(ValueError):
    """A snapshot is corrupted, of another version, or from a differently configured environment."""


def fingerprint(config: dict[str, Any]) -> str:
    """Short sha256 of a JSON-serialisable configuration (keys sorted)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def snapshot_text(snapshot: dict[str, Any]) -> str:
    """The JSON text of a snapshot, as the environments report it in ``info["snapshot"]``.

    A ``str`` rather than the dict, so that Gymnasium's ``SyncVectorEnv`` / ``AsyncVectorEnv`` stack it
    into an object array as it is: they stack a dict info field by field, into fixed-width arrays, and
    the user RNG's 128-bit PCG64 state overflows an int64. JSON keeps those integers exact, so
    ``reset(options={"snapshot": text})`` restores the state exactly.
    """
    return json.dumps(snapshot)


@dataclass
class DialogueState:
    """One conversation in progress.

    Attributes:
        prompt_id: id of the prompt row that started it.
        messages: the dialogue so far; between steps it ends with the user message of turn ``turn``.
        horizon: H, the number of assistant turns in the episode.
        rng: the episode's random generator (seeds the simulated user's sampling).
        done: the episode has ended (horizon reached or token budget exceeded).
        final_reward: the reward given when the episode ended (NaN while it goes on or if unscorable).
    """

    prompt_id: str
    messages: list[Message]
    horizon: int
    rng: np.random.Generator
    done: bool = False
    final_reward: float = float("nan")

    @property
    def turn(self) -> int:
        """h: 1-based index of the current turn (number of user messages so far)."""
        return count_turns(self.messages)

    @property
    def truncated(self) -> bool:
        """The episode ended on the token budget before its horizon."""
        return self.done and self.turn < self.horizon

    def to_snapshot(self, config_fingerprint: str) -> dict[str, Any]:
        """A JSON-serialisable snapshot of this state (O(messages) to take and to restore)."""
        if self.done:
            raise SnapshotError("cannot snapshot a finished episode; snapshot before the last step")
        return {
            "version": SNAPSHOT_VERSION,
            "config_fingerprint": config_fingerprint,
            "prompt_id": self.prompt_id,
            "messages": [dict(message) for message in self.messages],  # flat str dicts: a full copy, fast
            "turn": self.turn,
            "horizon": self.horizon,
            "rng_state": self.rng.bit_generator.state,
        }

    @classmethod
    def from_snapshot(cls, snapshot: Any, config_fingerprint: str, max_horizon: int) -> DialogueState:
        """Restore a state from :meth:`to_snapshot` output or its JSON text, checking it field by field.

        The JSON text is what the environments put in ``info["snapshot"]`` (see :func:`snapshot_text`).

        Raises:
            SnapshotError: not JSON text, wrong type, version or configuration, or inconsistent
                fields; the message names the field.
        """
        if isinstance(snapshot, str):
            try:
                snapshot = json.loads(snapshot)
            except json.JSONDecodeError as error:
                raise SnapshotError(
                    f"snapshot must be a dict from env.snapshot() or its JSON text (info['snapshot']); "
                    f"got a str that is not JSON: {error}"
                ) from error
        if not isinstance(snapshot, dict):
            raise SnapshotError(
                f"snapshot must be a dict from env.snapshot() or its JSON text, got {type(snapshot).__name__}"
            )
        missing = {"version", "config_fingerprint", "prompt_id", "messages", "turn", "horizon", "rng_state"} - set(
            snapshot
        )
        if missing:
            raise SnapshotError(f"snapshot is missing fields {sorted(missing)}")
        if snapshot["version"] != SNAPSHOT_VERSION:
            raise SnapshotError(f"snapshot version {snapshot['version']!r} is not {SNAPSHOT_VERSION}")
        if snapshot["config_fingerprint"] != config_fingerprint:
            raise SnapshotError(
                f"snapshot comes from an environment configured differently (fingerprint "
                f"{snapshot['config_fingerprint']!r}, this env {config_fingerprint!r}); restore it in an env "
                "made with the same prompts, user simulator, reward and horizon settings"
            )
        try:
            messages = validate_messages(snapshot["messages"], where="snapshot['messages']")
        except MessageFormatError as error:
            raise SnapshotError(str(error)) from error
        if not messages or messages[-1]["role"] != "user":
            raise SnapshotError("snapshot['messages'] must end with a user message (the state s_h)")
        horizon, turn = snapshot["horizon"], snapshot["turn"]
        if not isinstance(horizon, int) or not 1 <= horizon <= max_horizon:
            raise SnapshotError(f"snapshot['horizon'] must be an int in 1..{max_horizon}, got {horizon!r}")
        if turn != count_turns(messages) or turn > horizon:
            raise SnapshotError(
                f"snapshot['turn']={turn!r} disagrees with its {count_turns(messages)} user messages "
                f"or exceeds horizon {horizon}"
            )
        rng = np.random.Generator(np.random.PCG64())
        try:
            rng.bit_generator.state = snapshot["rng_state"]
        except (TypeError, ValueError, KeyError) as error:
            raise SnapshotError(f"snapshot['rng_state'] is not a PCG64 state: {error}") from error
        return cls(prompt_id=str(snapshot["prompt_id"]), messages=messages, horizon=horizon, rng=rng)
