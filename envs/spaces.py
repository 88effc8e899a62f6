"""Gymnasium spaces for chat text and dialogues."""

from __future__ import annotations

import multiprocessing
from types import ModuleType
from typing import Any, NoReturn

from gymnasium import spaces
from gymnasium.vector.utils import create_shared_memory

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


class DialogueSpace(spaces.Sequence):
    """Space of a dialogue: a tuple of messages, a :class:`gymnasium.spaces.Sequence` of :func:`message_space`.

    Its own class so that Gymnasium's ``AsyncVectorEnv`` stops with a message that says what to do:
    a dialogue is variable-length text, which has no fixed-size shared-memory layout, so the env
    runs in ``async`` mode only with ``vector_kwargs={"shared_memory": False}`` (the observations
    then travel through the worker pipes).
    """


@create_shared_memory.register(DialogueSpace)
def _no_shared_memory(space: DialogueSpace, n: int = 1, ctx: ModuleType = multiprocessing) -> NoReturn:
    """Gymnasium's hook for observations in shared memory (``AsyncVectorEnv(shared_memory=True)``).

    Raises:
        TypeError: always, naming the two ways that work.
    """
    raise TypeError(
        "dialogsim envs observe dialogues (variable-length text), which AsyncVectorEnv cannot keep in "
        "shared memory. For one process per conversation pass vector_kwargs={'shared_memory': False}: "
        "gym.make_vec(env_id, num_envs=N, vectorization_mode='async', vector_kwargs={'shared_memory': False}); "
        "for one process that batches each step's model calls over all N conversations use "
        "vectorization_mode='vector_entry_point' (the default)."
    )


def dialogue_space(max_chars: int) -> DialogueSpace:
    """Space of a dialogue: a tuple of messages (see :func:`message_space`)."""
    return DialogueSpace(message_space(max_chars))


def as_observation(messages: list[dict[str, str]]) -> tuple[dict[str, str], ...]:
    """A fresh tuple-of-dicts observation for ``messages`` (never shares objects with the state)."""
    return tuple({"role": message["role"], "content": message["content"]} for message in messages)
