"""Rewards and judges from the user's own code: ``--reward package.module:name`` or an installed plugin's name.

A spec names a Python object in one of two ways:

- ``package.module:name`` (``name`` may be dotted, ``module:Class.factory``), the syntax of entry points, loaded with
  :class:`importlib.metadata.EntryPoint`; the module must be importable (installed, or on ``PYTHONPATH``);
- the name of an entry point that an installed package registers in a group (:data:`REWARD_GROUP`,
  :data:`JUDGE_GROUP`), e.g. in its ``pyproject.toml``::

      [project.entry-points."dialogsim.rewards"]
      brevity = "my_rewards:brevity"

The object is then turned into the contract's value (:func:`build_plugin`): an instance of it is used as it is;
a class is instantiated without arguments; a function that takes the contract's arguments is a plain scoring
function, wrapped by the caller (NaN with a counted reason on failure); a function without arguments is a
factory whose result must satisfy the contract.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from dialogsim.console import UsageError

REWARD_GROUP = "dialogsim.rewards"
JUDGE_GROUP = "dialogsim.judges"
SCORED_TASKS_ATTRIBUTE = "scored_tasks"  # task prefixes a reward plugin scores; absent: every task
_OBJECT_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # module:attribute, as in entry points

T = TypeVar("T")


def find_plugin(spec: str, group: str, flag: str) -> Any | None:
    """The object named by ``spec`` (see the module docstring), or ``None`` when ``spec`` names no plugin.

    ``None`` means: neither ``module:attribute`` nor an entry point of ``group``, so the caller reads ``spec`` its
    own way (a built-in name, a model id). Importing the object runs the user's module, nothing more.

    Args:
        spec: the flag's value.
        group: the entry-point group searched for a plain name.
        flag: the flag, for messages (``"--reward"``).

    Raises:
        UsageError: ``module:attribute`` whose module cannot be imported or that lacks the attribute, or an entry
            point that fails to load; the message names the spec and the import error.
    """
    if _OBJECT_REFERENCE.match(spec):
        point = EntryPoint(name=spec, value=spec, group=group)
        where = f"{flag} {spec}"
    else:
        found = entry_points(group=group, name=spec)
        if not found:
            return None
        (point, *_) = found
        where = f"{flag} {spec} (entry point {point.value} in group {group})"
    try:
        return point.load()
    except (ImportError, AttributeError) as error:
        raise UsageError(
            f"{where}: cannot load it ({type(error).__name__}: {error}); give package.module:name of an importable "
            "module (installed, or on PYTHONPATH) that defines name"
        ) from None


def installed_plugins(group: str) -> list[str]:
    """The entry-point names registered in ``group`` by installed packages, sorted."""
    return sorted(point.name for point in entry_points(group=group))


def build_plugin(
    found: Any, spec: str, flag: str, contract: type[T], arguments: int, wrap: Callable[[Callable[..., Any], str], T]
) -> T:
    """The contract's value from a loaded plugin object (:func:`find_plugin`).

    Args:
        found: the object: an instance of ``contract``, a class, a factory without arguments, or a function of
            ``arguments`` positional arguments (wrapped with ``wrap(function, spec)``).
        spec / flag: for messages.
        contract: a ``runtime_checkable`` protocol, e.g. :class:`~dialogsim.rewards.base.RewardModel`.
        arguments: how many positional arguments a plain function of the contract takes.

    Raises:
        UsageError: the object is none of those, or a class or factory returns something that is not a
            ``contract`` (its methods and attributes are named).
    """
    if isinstance(found, contract) and not inspect.isclass(found):
        return found
    if inspect.isclass(found):
        built = found()
    elif callable(found) and _takes(found, arguments):
        return wrap(found, spec)
    elif callable(found) and _takes(found, 0):
        built = found()
    else:
        built = found
    if not isinstance(built, contract):
        members = ", ".join(sorted(_protocol_members(contract)))
        raise UsageError(
            f"{flag} {spec}: {type(built).__name__} is not a {contract.__name__} (it needs {members}); give a class "
            f"or instance with them, a factory returning one, or a function of {arguments} argument(s)"
        )
    return built


def scored_tasks(found: Any) -> tuple[str, ...] | None:
    """The task prefixes a reward plugin scores (its ``scored_tasks`` attribute), ``None`` (every task) if absent.

    Raises:
        UsageError: the attribute is not a string or a collection of strings.
    """
    tasks = getattr(found, SCORED_TASKS_ATTRIBUTE, None)
    if tasks is None:
        return None
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not all(isinstance(task, str) for task in tasks):
        raise UsageError(f"{SCORED_TASKS_ATTRIBUTE} of {found!r} must be task prefixes such as ('Math', 'Coding')")
    return tasks


def _takes(function: Callable[..., Any], count: int) -> bool:
    """Whether ``function`` can be called with ``count`` positional arguments."""
    try:
        inspect.signature(function).bind(*range(count))
    except TypeError:
        return False
    except ValueError:  # no signature (some built-ins): take it as a function of the contract
        return count > 0
    return True


def _protocol_members(protocol: type) -> set[str]:
    """A protocol's public methods and attributes."""
    return {name for name in [*vars(protocol), *protocol.__annotations__] if not name.startswith("_")}
