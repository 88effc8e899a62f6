"""Child side of the code sandbox: runs ONE untrusted Python program under limits, then exits.

This file is executed as a script by :mod:`dialogsim.rewards.sandbox`, never imported by dialogsim, and
uses the standard library only::

    [unshare --net --mount --propagation private --] python -I -B sandbox_child.py SETTINGS_JSON

with the working directory set to a fresh temporary folder that holds the program. In order:

1. read the program and delete its file (the code cannot read back what the parent appended to it);
2. with ``readonly_filesystem`` (only inside a private mount namespace): bind the working folder onto
   itself, then remount every other mount read-only, so the code can write to its own folder only;
3. ``resource.setrlimit``: address space, CPU seconds, size of written files, no core dumps;
4. with ``audit_hook``: a ``sys.addaudithook`` guard that raises :class:`SandboxViolation` on sockets,
   process creation, signals to other processes, ``ctypes`` and writes outside the working folder;
5. ``exec`` the program in a fresh namespace whose ``__name__`` is ``"__sandbox__"`` (so demo code
   under ``if __name__ == "__main__":`` does not run).

Exit status: the program's own; :data:`SETUP_FAILED` when a step before 5 failed (the reason on stderr,
after :data:`SETUP_FAILED_MARKER`).
"""

from __future__ import annotations

import builtins
import json
import os
import resource
import sys
from collections.abc import Callable

SETUP_FAILED = 121
SETUP_FAILED_MARKER = "dialogsim-sandbox-setup-failed:"
VIOLATION_MARKER = "SandboxViolation"
# Linux mount(2) flags (<sys/mount.h>).
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_RELATIME = 1024, 2048, 4096, 1 << 21
_OPTION_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}
_DENIED_EVENTS = (
    "socket.",
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "ctypes.",
    "os.symlink",
    "os.link",
)
_PATH_EVENTS = {  # event -> positions of path arguments that must stay inside the working folder
    "os.remove": (0,),
    "os.rename": (0, 1),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.truncate": (0,),
    "os.utime": (0,),
    "shutil.rmtree": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_DENIED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes"})


class SandboxViolation(RuntimeError):
    """An operation the sandbox forbids (network, processes, ctypes, writes outside the working folder)."""


def _inside(path: object, folder: str) -> bool:
    """Whether ``path`` (str, bytes or an open file descriptor) lies in ``folder``, by string (no syscalls)."""
    if isinstance(path, int):
        return True  # an already open descriptor, e.g. stdout
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    absolute = os.path.normpath(os.path.join(folder, text))
    return absolute == folder or absolute.startswith(folder + os.sep)


def make_guard(folder: str) -> Callable[[str, tuple], None]:
    """The audit hook: raise :class:`SandboxViolation` on denied events (Python's audit event names)."""

    def guard(event: str, args: tuple) -> None:
        if event.startswith(_DENIED_EVENTS):
            raise SandboxViolation(f"{event} is not allowed in the sandbox")
        if event == "import" and args[0] in _DENIED_IMPORTS:
            raise SandboxViolation(f"importing {args[0]} is not allowed in the sandbox")
        if event == "open" and args[2] & _WRITE_FLAGS and not _inside(args[0], folder):
            raise SandboxViolation(f"writing {args[0]!r} outside the sandbox folder is not allowed")
        for position in _PATH_EVENTS.get(event, ()):
            if not _inside(args[position], folder):
                raise SandboxViolation(f"{event} on {args[position]!r} outside the sandbox folder is not allowed")

    return guard


def _mount_points() -> list[tuple[str, int]]:
    """Mount points of this namespace with the flags that must be kept when remounting them."""
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape")  # octal escapes such as \040 for a space
            flags = sum(_OPTION_FLAGS.get(option, 0) for option in fields[5].split(","))
            points.append((target, flags))
    return points


def make_filesystem_read_only(folder: str) -> None:
    """Bind ``folder`` onto itself, then remount every mount read-only except it (private namespace only).

    Raises:
        OSError: a mount call failed (the caller reports it as a setup failure).
    """
    import ctypes  # loaded before the audit hook exists; the hook denies ctypes afterwards

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source: str | None, target: str, flags: int) -> None:
        encoded = None if source is None else source.encode()
        if libc.mount(encoded, target.encode(), None, flags, None) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"mount({source!r}, {target!r}, flags={flags}): {os.strerror(error)}")

    mount(folder, folder, MS_BIND)
    for target, flags in _mount_points():
        if target != folder:
            mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
    os.chdir(folder)  # the old working directory still refers to the folder below the new bind mount


def set_limits(settings: dict) -> None:
    """Address space (bytes), CPU time (s), written file size (bytes) and core size (0) of this process."""
    resource.setrlimit(resource.RLIMIT_AS, (settings["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (settings["cpu_seconds"], settings["cpu_seconds"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (settings["file_size_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main() -> None:
    """Set up the sandbox from ``sys.argv[1]`` (JSON settings) and run the program in the working folder."""
    settings = json.loads(sys.argv[1])
    folder = os.path.realpath(os.getcwd())
    try:
        with open(settings["program"], encoding="utf-8") as handle:
            source = handle.read()
        os.unlink(settings["program"])
        if settings["readonly_filesystem"]:
            make_filesystem_read_only(folder)
        set_limits(settings)
    except (OSError, ValueError) as error:
        print(f"{SETUP_FAILED_MARKER} {error}", file=sys.stderr)
        sys.exit(SETUP_FAILED)
    sys.argv = [settings["program"]]
    code = compile(source, settings["program"], "exec")
    if settings["audit_hook"]:
        sys.addaudithook(make_guard(folder))
    exec(code, {"__name__": "__sandbox__", "__builtins__": builtins})


if __name__ == "__main__":
    main()
