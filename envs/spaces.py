"""Gymnasium spaces for chat text and dialogues."""

from __future__ import annotations

import difflib
import multiprocessing
import re
from collections.abc import Collection
from types import ModuleType
from typing import Any, NoReturn

from gymnasium import spaces
from gymnasium.vector.utils import create_shared_memory

ROLE_CHARSET = frozenset("systemuserassistant")
# Surrogate code points (U+D800..U+DFFF) are not characters: UTF-8 cannot encode them, so tokenizers fail.
_SURROGATE = re.compile("[\ud800-\udfff]")


class UnicodeText(spaces.Text):
    """A :class:`gymnasium.spaces.Text` that contains any ``str`` of allowed length.

    Chat text uses the whole of Unicode; ``Text`` only admits its finite ``charset``. Sampling still
    draws from ``charset`` (alphanumerics by default), which is enough for ``check_env``.
    """

    def contains(self, x: Any) -> bool:
        """Whether ``x`` is a ``str`` of ``min_length..max_length`` characters with no surrogate code point."""
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length and not _SURROGATE.search(x)

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
    then travel through the worker pipes). Add ``"context": "spawn"``: a worker forked from a process
    whose PyTorch OpenMP pool has already run fails with "Invalid thread pool" when it loads its model.
    """


@create_shared_memory.register(DialogueSpace)
def _no_shared_memory(space: DialogueSpace, n: int = 1, ctx: ModuleType = multiprocessing) -> NoReturn:
    """Gymnasium's hook for observations in shared memory (``AsyncVectorEnv(shared_memory=True)``).

    Raises:
        TypeError: always, naming the two ways that work.
    """
    raise TypeError(
        "dialogsim envs observe dialogues (variable-length text), which AsyncVectorEnv cannot keep in "
        "shared memory. For one process per conversation pass vector_kwargs={'shared_memory': False, "
        "'context': 'spawn'} (spawned workers: PyTorch's thread pool does not survive a fork): gym.make_vec(env_id, "
        "num_envs=N, vectorization_mode='async', vector_kwargs={'shared_memory': False, 'context': 'spawn'}); "
        "for one process that batches each step's model calls over all N conversations use "
        "vectorization_mode='vector_entry_point' (the default)."
    )


def dialogue_space(max_chars: int) -> DialogueSpace:
    """Space of a dialogue: a tuple of messages (see :func:`message_space`)."""
    return DialogueSpace(message_space(max_chars))


def as_observation(messages: list[dict[str, str]]) -> tuple[dict[str, str], ...]:
    """A fresh tuple-of-dicts observation for ``messages`` (never shares objects with the state)."""
    return tuple({"role": message["role"], "content": message["content"]} for message in messages)


def check_reply(action: Any, space: spaces.Space, where: str) -> str:
    """``action`` if it is a reply in ``space``, else an error naming ``where`` (e.g. ``"actions[3]"``).

    Raises:
        TypeError: ``action`` is not a ``str``.
        ValueError: it holds a surrogate code point (a lone ``"\\ud800"``: not UTF-8 encodable), or is
            otherwise outside ``space`` (too long, not one of the choices).
    """
    if not isinstance(action, str):
        raise TypeError(f"{where} must be the assistant reply as a str, got {type(action).__name__}: {action!r:.80}")
    surrogate = _SURROGATE.search(action)
    if surrogate:
        raise ValueError(
            f"{where} holds the surrogate code point {surrogate.group()!r} at character {surrogate.start()}, which "
            "is not valid Unicode text; decode model output with errors='replace' (or drop the surrogates)"
        )
    if not space.contains(action):
        raise ValueError(f"{where} has {len(action)} characters ({action!r:.40}); the action space allows {space}")
    return action


def check_option_keys(options: dict[str, Any], allowed: Collection[str], where: str) -> None:
    """Raise unless every key of ``options`` is in ``allowed``; the message suggests the closest allowed key.

    Raises:
        ValueError: names the unknown key(s), the allowed keys and, for a near miss, the intended key.
    """
    unknown = sorted(set(options) - set(allowed), key=str)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ValueError(f"{where}: unknown option(s) {', '.join(hints)}; accepted: {', '.join(sorted(allowed))}")
