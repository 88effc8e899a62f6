"""How every console command ends: exit codes, one-line errors, and ``--debug`` for the traceback.

Shared by ``refuel-train``, ``refuel-evaluate``, ``refuel-plan``, the other ``python -m`` entries and the
``bench/`` scripts, whose ``main`` functions are wrapped in :func:`console_command`:

=========  ======================================================================================================
exit code  meaning
=========  ======================================================================================================
0          done
1          failed during the work: ``error: <type>: <cause>; <what the command left on disk>`` on stderr
2          refused before the work: a setting, file, model name or combination (:class:`UsageError`, and
           argparse's own flag errors): ``error: <what, where, how to fix>`` on stderr
=========  ======================================================================================================

``--debug`` anywhere on the command line, or the environment variable ``DIALOGSIM_DEBUG=1``, lets the
exception through with its Python traceback instead. The convention is argparse's and ``click``'s (usage
errors exit 2) and the one of TRL's and vLLM's command lines (a configuration error is one message).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

DEBUG_FLAG = "--debug"
DEBUG_ENV = "DIALOGSIM_DEBUG"
FAILURE_EXIT = 1
USAGE_EXIT = 2
EPILOG = (
    f"Exit status: 0 done, {FAILURE_EXIT} failed during the work (one line: the cause and what was left on disk), "
    f"{USAGE_EXIT} refused (one line: the setting, file or model, and the fix). {DEBUG_FLAG} (or {DEBUG_ENV}=1) "
    "prints the Python traceback instead."
)
_STATE = "dialogsim_state"  # the attribute of an exception that carries what the command left on disk

MainFunction = Callable[[list[str]], int | None]


class Command(Protocol):
    """A wrapped ``main``: ``argv`` defaults to ``sys.argv[1:]``; returns the exit status (``None``: 0)."""

    def __call__(self, argv: Sequence[str] | None = None) -> int | None: ...


class UsageError(ValueError):
    """A setting, file, model name or combination that a command refuses; commands exit 2 with its message.

    The message says what was refused, where (flag, file:line:column, field) and how to fix it. A ``ValueError``,
    so code that catches those (and tests written before this class) keeps working.
    """


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether ``argv`` holds ``--debug`` or ``DIALOGSIM_DEBUG`` is set to anything but ``""``, ``0`` or ``false``."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false")


def console_command(main: MainFunction) -> Command:
    """Wrap a command's ``main(argv)`` in the exit-code convention of this module.

    The wrapped function takes ``argv`` (default ``sys.argv[1:]``), removes ``--debug`` from it and calls
    ``main`` with the rest. ``main`` returns ``None`` or an exit status (as console scripts' ``sys.exit(main())``
    expects); ``SystemExit`` (``--help``, argparse's flag errors) passes through.

    Raises:
        SystemExit: 2 after a :class:`UsageError`, 1 after any other exception, each with its one ``error:`` line
            on stderr; without ``--debug``, never a traceback.
    """

    @functools.wraps(main)
    def command(argv: Sequence[str] | None = None) -> int | None:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = debug_requested(args)
        try:
            return main([arg for arg in args if arg != DEBUG_FLAG])
        except Exception as error:
            if debug:
                raise
            print(f"error: {error_line(error)}", file=sys.stderr)
            sys.exit(USAGE_EXIT if isinstance(error, UsageError) else FAILURE_EXIT)

    return command


def error_line(error: Exception) -> str:
    """The one line a command prints for ``error`` (without the ``error:`` prefix).

    A :class:`UsageError` is its message; any other exception is ``<type>: <message>``, then what the command
    left on disk (:func:`failure_state`) and how to see the traceback. Line breaks are folded into spaces.
    """
    message = " ".join(str(error).split()) or repr(error)
    if isinstance(error, UsageError):
        return message
    state = getattr(error, _STATE, None)
    parts = [f"{type(error).__name__}: {message}", state, f"rerun with {DEBUG_FLAG} for the traceback"]
    return "; ".join(part for part in parts if part)


@contextlib.contextmanager
def failure_state(describe: Callable[[], str]) -> Iterator[None]:
    """Attach ``describe()`` (what the command left on disk, e.g. a run folder's finished stages) to an exception
    raised inside, for its failure line (:func:`error_line`); a :class:`UsageError` is left as it is.

    The exception itself is re-raised unchanged, so ``--debug`` shows its own traceback.
    """
    try:
        yield
    except Exception as error:
        if not isinstance(error, UsageError):
            setattr(error, _STATE, describe())
        raise
