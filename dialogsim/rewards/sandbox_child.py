"""Child side of the code sandbox: runs ONE untrusted Python program under limits, then exits.

This file is executed as a script by :mod:`dialogsim.rewards.sandbox`, never imported by dialogsim, and
uses the standard library only::

    [unshare --net --mount --pid --fork --kill-child --propagation private --] \
        python -I -B sandbox_child.py SETTINGS_JSON

with the working directory set to a fresh temporary folder that holds the program. In order:

1. read the program and delete its file (the code cannot read back what the parent appended to it);
2. with ``new_root`` (only inside new mount + PID namespaces, as root): build a minimal root file system
   on a tmpfs at ``new_root`` (:func:`enter_minimal_root`): read-only binds of the system library
   folders and of :func:`readable_roots` (the interpreter's prefix, standard library, site-packages),
   the working folder read-write, a fresh ``/proc`` of the new PID namespace (this process is PID 1 and
   sees only itself); ``pivot_root`` into it and detach the old root, so home folders, ``/etc``,
   ``/tmp`` and other processes no longer exist for the code; then drop to the unprivileged user
   :data:`SANDBOX_UID` (no capabilities: the mounts and limits cannot be undone);
3. ``resource.setrlimit``: address space, CPU seconds, size of written files, no core dumps;
4. close ``status_fd`` (setup errors go there, not to stderr, so the code cannot forge one);
5. with ``audit_hook``: a ``sys.addaudithook`` guard (:func:`make_guard`) that raises
   :class:`SandboxViolation` on sockets, process creation, signals to other processes, ``ctypes``,
   writes outside the working folder and reads outside :func:`readable_roots` and the folder;
6. ``exec`` the program in a fresh namespace whose ``__name__`` is ``"__sandbox__"`` (so demo code
   under ``if __name__ == "__main__":`` does not run).

Exit status: the program's own; :data:`SETUP_FAILED` when a step before 4 failed (the reason written to
``status_fd``).
"""

from __future__ import annotations

import builtins
import json
import os
import platform
import resource
import sys
import sysconfig
from collections.abc import Callable, Iterable

SETUP_FAILED = 121
VIOLATION_MARKER = "SandboxViolation"
SANDBOX_UID = 65534  # "nobody": owns no file in the minimal root, holds no capability
SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32")  # shared libraries the interpreter loads
# Linux mount(2) / umount2(2) flags (<sys/mount.h>) and pivot_root(2) numbers (<asm/unistd.h>).
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
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
_FOLDER_EVENTS = {  # event -> positions of path arguments that must stay inside the working folder
    "os.chdir": (0,),
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
_READ_EVENTS = {"os.listdir": (0,), "os.scandir": (0,), "sqlite3.connect": (0,)}  # paths that must be readable
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_DENIED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes"})


class SandboxViolation(RuntimeError):
    """An operation the sandbox forbids (network, processes, ctypes, writes or reads outside the allowed paths)."""


def readable_roots() -> tuple[str, ...]:
    """Folders the code may read besides its own: the interpreter's prefixes, standard library, site-packages.

    Real paths (symbolic links resolved), sorted, without folders that lie inside another one.
    """
    paths = sysconfig.get_paths()
    candidates = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    candidates |= {paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    return _outermost(os.path.realpath(path) for path in candidates)


def _outermost(paths: Iterable[str]) -> tuple[str, ...]:
    """``paths`` without those inside another of them, sorted."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(_under(path, (parent,)) for parent in kept):
            kept.append(path)
    return tuple(kept)


def _under(absolute: str, roots: tuple[str, ...]) -> bool:
    return any(absolute == root or absolute.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _within(path: object, folder: str, roots: tuple[str, ...]) -> bool:
    """Whether ``path`` (str, bytes, an open descriptor), relative to ``folder``, lies in ``roots`` (by string)."""
    if isinstance(path, int):
        return True  # an already open descriptor, e.g. stdout
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    if text.startswith("file:"):
        return False  # a URI (sqlite3 with uri=True) names a file elsewhere
    return _under(os.path.normpath(os.path.join(folder, text)), roots)


def make_guard(folder: str, readable: tuple[str, ...]) -> Callable[[str, tuple], None]:
    """The audit hook: raise :class:`SandboxViolation` on denied events (Python's audit event names).

    Args:
        folder: the working folder (real path): the only place the code may write to or ``chdir`` into.
        readable: folders the code may also read (:func:`readable_roots`).
    """
    writable = (folder,)
    readable = (*readable, folder)

    def guard(event: str, args: tuple) -> None:
        if event.startswith(_DENIED_EVENTS):
            raise SandboxViolation(f"{event} is not allowed in the sandbox")
        if event == "import" and args[0] in _DENIED_IMPORTS:
            raise SandboxViolation(f"importing {args[0]} is not allowed in the sandbox")
        if event == "open":
            writing = bool(args[2] & _WRITE_FLAGS)
            if not _within(args[0], folder, writable if writing else readable):
                action = "writing" if writing else "reading"
                raise SandboxViolation(f"{action} {args[0]!r} outside the sandbox's folders is not allowed")
        for roots, events in ((writable, _FOLDER_EVENTS), (readable, _READ_EVENTS)):
            for position in events.get(event, ()):
                if not _within(args[position], folder, roots):
                    raise SandboxViolation(
                        f"{event} on {args[position]!r} outside the sandbox's folders is not allowed"
                    )

    return guard


def enter_minimal_root(folder: str, new_root: str, readable: tuple[str, ...]) -> None:
    """Make a minimal root file system at ``new_root``, ``pivot_root`` into it and drop to :data:`SANDBOX_UID`.

    Must run as root in fresh mount and PID namespaces (``unshare --mount --pid --fork``). The new root is
    a read-only tmpfs holding read-only binds of :data:`SYSTEM_DIRS` (symbolic links such as ``/lib ->
    usr/lib`` are copied as links) and ``readable``, ``folder`` read-write (owned by :data:`SANDBOX_UID`)
    and a ``/proc`` of this PID namespace; all paths keep their absolute names.

    Raises:
        OSError: a mount call failed or ``pivot_root``'s number is unknown for this machine (the caller
            reports it as a setup failure).
    """
    import ctypes  # loaded before the audit hook exists; the hook denies ctypes afterwards

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, call: str) -> None:
        if result != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"{call}: {os.strerror(error)}")

    def mount(source: str | None, target: str, kind: str | None, flags: int, options: str | None = None) -> None:
        encoded = [None if text is None else text.encode() for text in (source, target, kind, options)]
        check(libc.mount(encoded[0], encoded[1], encoded[2], flags, encoded[3]), f"mount({source!r}, {target!r})")

    def bind(path: str, flags: int) -> None:
        target = new_root + path
        os.makedirs(target, exist_ok=True)
        mount(path, target, None, MS_BIND)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | flags)

    machine = platform.machine()
    if machine not in SYS_PIVOT_ROOT:
        raise OSError(f"pivot_root: system call number unknown for {machine!r}; add it to SYS_PIVOT_ROOT")
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), new_root + path)
        elif os.path.isdir(path):
            bind(path, MS_RDONLY)
    for path in readable:
        if not _under(path, SYSTEM_DIRS):
            bind(path, MS_RDONLY)
    bind(folder, MS_NOEXEC)
    os.chown(folder, SANDBOX_UID, SANDBOX_UID)
    os.mkdir(new_root + "/proc")
    mount("proc", new_root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(new_root)
    check(libc.syscall(SYS_PIVOT_ROOT[machine], b".", b"."), "pivot_root('.', '.')")  # old root now on top
    check(libc.umount2(b".", MNT_DETACH), "umount2('.', MNT_DETACH)")  # ... and gone
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(folder)
    os.setgroups([])
    os.setgid(SANDBOX_UID)
    os.setuid(SANDBOX_UID)


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
    readable = readable_roots()
    try:
        with open(settings["program"], encoding="utf-8") as handle:
            source = handle.read()
        os.unlink(settings["program"])
        if settings["new_root"] is not None:
            enter_minimal_root(folder, os.path.realpath(settings["new_root"]), readable)
        set_limits(settings)
    except (OSError, ValueError) as error:
        os.write(settings["status_fd"], f"{type(error).__name__}: {error}".encode())
        sys.exit(SETUP_FAILED)
    os.close(settings["status_fd"])
    sys.argv = [settings["program"]]
    code = compile(source, settings["program"], "exec")
    if settings["audit_hook"]:
        sys.addaudithook(make_guard(folder, readable))
    exec(code, {"__name__": "__sandbox__", "__builtins__": builtins})


if __name__ == "__main__":
    main()
