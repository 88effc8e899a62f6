"""Chat messages in the ``transformers`` chat format and their validation."""

from __future__ import annotations

from typing import Literal, TypedDict

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class Message(TypedDict):
    """One chat message: ``{"role": "user" | "assistant" | "system", "content": str}``."""

    role: Role
    content: str


class MessageFormatError(ValueError):
    """A dialogue is not a list of ``{"role", "content"}`` messages in a valid order."""


def validate_messages(messages: object, where: str = "dialogue") -> list[Message]:
    """Check that ``messages`` is a chat dialogue and return it as a list of messages.

    A dialogue is an optional leading system message followed by alternating user/assistant
    messages that starts with a user message.

    Args:
        messages: candidate dialogue.
        where: a label for error messages (file and line, env turn, ...).

    Raises:
        MessageFormatError: naming the offending message index and field.
    """
    if not isinstance(messages, (list, tuple)):
        raise MessageFormatError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    checked: list[Message] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise MessageFormatError(
                f"{where}: message {index} must be a dict with keys 'role' and 'content', got {message!r:.80}"
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise MessageFormatError(f"{where}: message {index} has unknown role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise MessageFormatError(
                f"{where}: message {index} field 'content' must be str, got {type(content).__name__}"
            )
        checked.append({"role": role, "content": content})
    body = checked[1:] if checked and checked[0]["role"] == "system" else checked
    for index, message in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise MessageFormatError(
                f"{where}: roles must alternate user/assistant starting with user; "
                f"message {index + len(checked) - len(body)} is {message['role']!r}, expected {expected!r}"
            )
    return checked


def count_turns(messages: list[Message]) -> int:
    """Number of user messages, i.e. the index h of the current turn (1-based)."""
    return sum(message["role"] == "user" for message in messages)


def truncate_to_turn(messages: list[Message], turn: int) -> list[Message]:
    """The dialogue up to and including the assistant reply of ``turn`` (1-based).

    Raises:
        ValueError: if the dialogue has no assistant reply at ``turn``.
    """
    kept: list[Message] = []
    replies = 0
    for message in messages:
        kept.append(message)
        if message["role"] == "assistant":
            replies += 1
            if replies == turn:
                return kept
    raise ValueError(f"dialogue has {replies} assistant replies, cannot truncate at turn {turn}")
