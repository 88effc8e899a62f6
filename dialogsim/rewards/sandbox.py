"""Run untrusted Python source in a separate, limited process: the parent side of the code sandbox.

Untrusted code never runs in our process. Each call of :func:`run_python` starts a fresh child
(:mod:`dialogsim.rewards.sandbox_child`) with

* a wall-clock timeout (the child's whole process group is killed) and an ``RLIMIT_CPU`` backstop;
* ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (written bytes, stdout/stderr included) and no core dumps;
* a fresh temporary folder as working directory, deleted afterwards; stdin from ``/dev/null``;
* an isolated environment: ``python -I -B`` (no ``PYTHON*`` variables, no user site, no script folder
  on ``sys.path``, no ``.pyc`` writes) and a minimal ``env`` (``PATH``, ``LANG``, ``HOME`` = ``TMPDIR``
  = the folder), never the parent's;
* **isolation level "namespaces"** (when ``unshare --net --mount --pid --fork`` works, e.g. as root on
  Linux): a new network namespace (no interface is up: every connection fails at the OS level), a new PID
  namespace (the child is PID 1 of its own ``/proc`` and sees no other process, so no other process's
  environment or command line), and a private mount namespace in which the child pivots into a minimal
  read-only root: the system library folders (``/usr``, ``/lib*``), the interpreter's prefix (standard
  library, site-packages) and the working folder (the only writable place) exist, nothing else (no home
  folders, no ``/etc``, no ``/tmp``); the code then runs as the unprivileged user ``nobody``;
* always, as a second layer (and the only one at level **"audit-hook"**, when namespaces are not
  available): a ``sys.addaudithook`` guard installed before the code runs that refuses sockets,
  process creation, signals to other processes, ``ctypes``, writes (and ``chdir``) outside the folder,
  and opening or listing files outside the interpreter's prefix, standard library, site-packages and
  the folder (so ``/etc``, home folders and ``/proc/<pid>/environ`` of other processes).

The audit-hook level is weaker and cannot stop: code that escapes the interpreter (a bug in a C
extension, a known audit-hook bypass); files opened by C code without an audit event (certificate files
read by ``ssl``, say); metadata (``os.stat``, ``os.path.exists``, ``os.readlink`` reveal which files
exist); ``dir_fd=`` paths (checked as if relative to the folder); and it runs the code as our own user.
Use containers or VMs for adversarial code. The level in use is :func:`isolation_level`.

What a program prints is untrusted: :class:`SandboxResult` keeps only the last ``max_output_chars`` of
each stream and leaves them out of its ``repr``; log or store them only marked as the program's output.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dialogsim.rewards import sandbox_child

logger = logging.getLogger(__name__)

CHILD_SCRIPT = Path(sandbox_child.__file__).resolve()
NAMESPACE_PREFIX = ("unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private", "--")
ISOLATION_LEVELS = ("namespaces", "audit-hook")
PROGRAM_NAME = "program.py"
_FILE_TOO_LARGE = f"[Errno {errno.EFBIG}]"  # Python ignores SIGXFSZ, so RLIMIT_FSIZE shows as this OSError


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    Attributes:
        timeout_seconds: wall-clock limit (s); the child's process group is killed after it.
        memory_bytes: ``RLIMIT_AS`` of the child (bytes of address space; the interpreter needs ~30 MB).
        file_size_bytes: ``RLIMIT_FSIZE`` (bytes): largest file the child may write, stdout/stderr included.
        max_output_chars: characters of stdout/stderr kept (the last ones) in the :class:`SandboxResult`.
        audit_hook: install the Python audit-hook guard (turn off only to test the OS-level layer).
    """

    timeout_seconds: float = 10.0
    memory_bytes: int = 512 * 2**20
    file_size_bytes: int = 8 * 2**20
    max_output_chars: int = 4000
    audit_hook: bool = True

    def __post_init__(self) -> None:
        if self.timeout_seconds <= 0 or self.memory_bytes <= 0 or self.file_size_bytes <= 0:
            raise ValueError(f"SandboxLimits: timeout, memory and file size must be positive, got {self}")


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did.

    Attributes:
        status: ``"ok"`` (exit status 0), ``"error"`` (other exit status, e.g. an uncaught exception),
            ``"timeout"`` (wall-clock or CPU limit), ``"memory_limit"`` (``MemoryError``),
            ``"output_limit"`` (file size limit hit), ``"blocked"`` (the audit hook refused an
            operation) or ``"setup_failed"`` (the sandbox itself could not be set up: not the code's fault).
        returncode: the child's exit status (negative: killed by that signal); ``None`` after a timeout.
        stdout / stderr: the last ``max_output_chars`` characters of each stream. **Untrusted**: whatever
            the program chose to print; left out of ``repr`` so that an assertion or log line showing the
            result does not carry it.
        seconds: wall-clock time of the run (s), process start included.
        isolation: the isolation level of the run (``"namespaces"`` or ``"audit-hook"``).
        setup_error: why the sandbox could not be set up (``status == "setup_failed"``), else ``None``;
            written by the child before the code ran, through a pipe the code never sees, so trusted.
    """

    status: str
    returncode: int | None
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)
    seconds: float
    isolation: str
    setup_error: str | None = None


@functools.cache
def isolation_level() -> str:
    """``"namespaces"`` if a program runs in the namespaces sandbox here (tried once), else ``"audit-hook"``.

    The probe runs the whole set-up (``unshare``, the minimal root, ``/proc``, the switch to ``nobody``),
    so a machine where any step is refused (a container without ``CAP_SYS_ADMIN``, say) falls back.
    """
    if sys.platform == "linux" and shutil.which("unshare") is not None:
        probe = _run("pass", SandboxLimits(timeout_seconds=30.0), "namespaces")
        if probe.status == "ok":
            return "namespaces"
        reason = probe.setup_error or probe.stderr.strip()  # our own program: the reason is unshare's or ours
        logger.warning("code sandbox: the namespaces level failed here (%s, %s)", probe.status, reason)
    logger.warning(
        "code sandbox: no network/mount/PID namespaces here; falling back to the weaker audit-hook guard "
        "(run as root on Linux with util-linux `unshare` for OS-level isolation)"
    )
    return "audit-hook"


def run_python(source: str, limits: SandboxLimits | None = None, isolation: str | None = None) -> SandboxResult:
    """Run ``source`` as a program in a fresh sandboxed child process (see the module docstring).

    Args:
        source: Python source code; untrusted.
        limits: resource limits; ``None`` uses :class:`SandboxLimits` defaults.
        isolation: ``"namespaces"`` or ``"audit-hook"``; ``None`` uses :func:`isolation_level` (the
            strongest available). ``"audit-hook"`` forces the weaker level (to test it).

    Returns:
        A :class:`SandboxResult`; never raises for anything the code does.

    Raises:
        ValueError: ``isolation`` is unknown, or ``"namespaces"`` where :func:`isolation_level` found
            namespaces unavailable.
        OSError: the child process could not be started at all (e.g. no temporary folder).
    """
    level = isolation or isolation_level()
    if level not in ISOLATION_LEVELS or (level == "namespaces" and isolation_level() != "namespaces"):
        raise ValueError(
            f"run_python: isolation {isolation!r} is not available here (choose from {ISOLATION_LEVELS}; "
            f"this machine supports {isolation_level()!r} at most)"
        )
    return _run(source, limits or SandboxLimits(), level)


def _run(source: str, limits: SandboxLimits, level: str) -> SandboxResult:
    """:func:`run_python` at ``level``, not checked against :func:`isolation_level`."""
    with tempfile.TemporaryDirectory(prefix="dialogsim-sandbox-") as scratch:
        folder = Path(scratch) / "work"  # the child's writable folder; the captured streams stay outside it
        folder.mkdir()
        (folder / PROGRAM_NAME).write_text(source, encoding="utf-8")
        new_root = Path(scratch) / "root" if level == "namespaces" else None  # mount point of the minimal root
        if new_root is not None:
            new_root.mkdir()
        stdout_path, stderr_path = Path(scratch) / "stdout", Path(scratch) / "stderr"
        status_read, status_write = os.pipe()
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr, os.fdopen(status_read, "rb") as status:
            started = time.perf_counter()
            try:
                child = _start(folder, new_root, limits, status_write, stdout, stderr)
            finally:
                os.close(status_write)
            returncode = _wait(child, limits.timeout_seconds)
            seconds = time.perf_counter() - started
            setup_error = status.read().decode("utf-8", errors="replace") or None
        out = _tail(stdout_path, limits.max_output_chars)
        err = _tail(stderr_path, limits.max_output_chars)
    status_name = "setup_failed" if setup_error else _status(returncode, err)
    return SandboxResult(status_name, returncode, out, err, seconds, level, setup_error)


def _start(
    folder: Path, new_root: Path | None, limits: SandboxLimits, status_fd: int, stdout: object, stderr: object
) -> subprocess.Popen:
    """Start the child (in new namespaces when ``new_root`` is given); ``status_fd`` is passed to it open."""
    settings = {
        "program": PROGRAM_NAME,
        "memory_bytes": limits.memory_bytes,
        "cpu_seconds": math.ceil(limits.timeout_seconds) + 1,
        "file_size_bytes": limits.file_size_bytes,
        "new_root": None if new_root is None else str(new_root),
        "status_fd": status_fd,
        "audit_hook": limits.audit_hook,
    }
    prefix = [] if new_root is None else list(NAMESPACE_PREFIX)
    environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(folder), "TMPDIR": str(folder)}
    return subprocess.Popen(
        [*prefix, sys.executable, "-I", "-B", str(CHILD_SCRIPT), json.dumps(settings)],
        cwd=folder,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        pass_fds=(status_fd,),
        start_new_session=True,  # its own process group, so a timeout kills everything it started
    )


def _wait(process: subprocess.Popen, timeout: float) -> int | None:
    """The exit status, or ``None`` after killing the process group on timeout."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


def _tail(path: Path, chars: int) -> str:
    """The last ``chars`` characters of a captured stream (where tracebacks and the pass marker are)."""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - 4 * chars))
        return handle.read().decode("utf-8", errors="replace")[-chars:]


def _status(returncode: int | None, stderr: str) -> str:
    if returncode is None or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if returncode == -signal.SIGXFSZ or _FILE_TOO_LARGE in stderr:
        return "output_limit"
    if returncode == 0:
        return "ok"
    if sandbox_child.VIOLATION_MARKER in stderr:
        return "blocked"
    return "memory_limit" if "MemoryError" in stderr else "error"
