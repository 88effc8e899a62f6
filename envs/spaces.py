"""Gymnasium spaces for chat text and dialogues."""

from __future__ import annotations

from typing import Any

from gymnasium import spaces

ROLE_CHARSET = frozenset("systemuserassistant")


class UnicodeText(spaces.Text):
    """A :class:`gymnasium.spaces.Text` that contains any ``str`` of allowed length.

    Chat text uses the whole of Unicode; ``Text`` only admits its finite ``charset``. Sampling still
    draws from ``charset`` (alphanumerics by default), which is enough for ``check_env``.
    """

    def contains(self, x: Any) -> bool:
        """Whether ``x`` is a ``str`` with ``min_length <= len(x) <= max_length`` (characters)."""
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"


def message_space(max_chars: int) -> spaces.Dict:
    """Space of one ``{"role", "content"}`` message with at most ``max_chars`` characters of content."""
    return spaces.Dict(
        {
            "role": spaces.Text(max_length=9, min_length=4, charset=ROLE_CHARSET),
            "content": UnicodeText(max_length=max_chars, min_length=0),
        }
    )


def dialogue_space(max_chars: int) -> spaces.Sequence:
    """Space of a dialogue: a tuple of messages (see :func:`message_space`)."""
    return spaces.Sequence(message_space(max_chars))


def as_observation(messages: list[dict[str, str]]) -> tuple[dict[str, str], ...]:
    """A fresh tuple-of-dicts observation for ``messages`` (never shares objects with the state)."""
    return tuple({"role": message["role"], "content": message["content"]} for message in messages)
