"""Run untrusted Python source in a separate, limited process: the parent side of the code sandbox.

Untrusted code never runs in our process. Each call of :func:`run_python` starts a fresh child
(:mod:`dialogsim.rewards.sandbox_child`) with

* a wall-clock timeout (the child's whole process group is killed) and an ``RLIMIT_CPU`` backstop;
* ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (written bytes, stdout/stderr included) and no core dumps;
* a fresh temporary folder as working directory, deleted afterwards; stdin from ``/dev/null``;
* an isolated environment: ``python -I -B`` (no ``PYTHON*`` variables, no user site, no script folder
  on ``sys.path``, no ``.pyc`` writes) and a minimal ``env`` (``PATH``, ``LANG``, ``HOME`` = ``TMPDIR``
  = the folder);
* **isolation level "namespaces"** (when ``unshare --net --mount`` works, e.g. as root on Linux): a new
  network namespace (no interface is up: every connection fails at the OS level) and a private mount
  namespace in which every mount except the working folder is remounted read-only;
* always, as a second layer (and the only one at level **"audit-hook"**, when namespaces are not
  available): a ``sys.addaudithook`` guard installed before the code runs that refuses sockets,
  process creation, signals to other processes, ``ctypes`` and file writes outside the folder.

The audit-hook level is weaker: audit hooks are a Python-level guard, and code that escapes the
interpreter (a bug in a C extension, say) would not be stopped; the code also runs as our user. Use
containers or VMs for adversarial code. The level in use is :func:`isolation_level`.
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
from dataclasses import dataclass
from pathlib import Path

from dialogsim.rewards import sandbox_child

logger = logging.getLogger(__name__)

CHILD_SCRIPT = Path(sandbox_child.__file__).resolve()
NAMESPACE_PREFIX = ("unshare", "--net", "--mount", "--propagation", "private", "--")
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
        stdout / stderr: the last ``max_output_chars`` characters of each stream.
        seconds: wall-clock time of the run (s), process start included.
        isolation: :func:`isolation_level` of the run.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: str


@functools.cache
def isolation_level() -> str:
    """``"namespaces"`` if new network + mount namespaces can be made here (tried once), else ``"audit-hook"``."""
    unshare = shutil.which("unshare")
    if sys.platform == "linux" and unshare is not None:
        probe = subprocess.run([unshare, *NAMESPACE_PREFIX[1:], "true"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return "namespaces"
        logger.warning("unshare --net --mount failed (%s)", probe.stderr.decode(errors="replace").strip())
    logger.warning(
        "code sandbox: no network/mount namespaces here; falling back to the weaker audit-hook guard "
        "(run as root on Linux with util-linux `unshare` for OS-level isolation)"
    )
    return "audit-hook"


def run_python(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``source`` as a program in a fresh sandboxed child process (see the module docstring).

    Args:
        source: Python source code; untrusted.
        limits: resource limits; ``None`` uses :class:`SandboxLimits` defaults.

    Returns:
        A :class:`SandboxResult`; never raises for anything the code does.

    Raises:
        OSError: the child process could not be started at all (e.g. no temporary folder).
    """
    limits = limits or SandboxLimits()
    level = isolation_level()
    with tempfile.TemporaryDirectory(prefix="dialogsim-sandbox-") as scratch:
        folder = Path(scratch) / "work"  # the child's writable folder; the captured streams stay outside it
        folder.mkdir()
        (folder / PROGRAM_NAME).write_text(source, encoding="utf-8")
        stdout_path, stderr_path = Path(scratch) / "stdout", Path(scratch) / "stderr"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            started = time.perf_counter()
            returncode = _wait(_start(folder, limits, level, stdout, stderr), limits.timeout_seconds)
            seconds = time.perf_counter() - started
        out = _tail(stdout_path, limits.max_output_chars)
        err = _tail(stderr_path, limits.max_output_chars)
    return SandboxResult(_status(returncode, err), returncode, out, err, seconds, level)


def _start(folder: Path, limits: SandboxLimits, level: str, stdout: object, stderr: object) -> subprocess.Popen:
    settings = {
        "program": PROGRAM_NAME,
        "memory_bytes": limits.memory_bytes,
        "cpu_seconds": math.ceil(limits.timeout_seconds) + 1,
        "file_size_bytes": limits.file_size_bytes,
        "readonly_filesystem": level == "namespaces",
        "audit_hook": limits.audit_hook,
    }
    prefix = list(NAMESPACE_PREFIX) if level == "namespaces" else []
    environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(folder), "TMPDIR": str(folder)}
    return subprocess.Popen(
        [*prefix, sys.executable, "-I", "-B", str(CHILD_SCRIPT), json.dumps(settings)],
        cwd=folder,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
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
    if returncode == sandbox_child.SETUP_FAILED and sandbox_child.SETUP_FAILED_MARKER in stderr:
        return "setup_failed"
    if returncode == 0:
        return "ok"
    if sandbox_child.VIOLATION_MARKER in stderr:
        return "blocked"
    return "memory_limit" if "MemoryError" in stderr else "error"
