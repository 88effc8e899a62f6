"""The code sandbox: untrusted programs run in a separate, limited process and cannot reach the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dialogsim.rewards import sandbox
from dialogsim.rewards.sandbox import SandboxLimits, isolation_level, run_python

FAST = SandboxLimits(timeout_seconds=10.0)  # generous: the 2 CPU cores are shared; timeouts are tested apart
NAMESPACES = pytest.mark.skipif(isolation_level() != "namespaces", reason="needs unshare --net --mount (root, Linux)")


def test_a_clean_program_runs_in_a_fresh_folder() -> None:
    result = run_python("import os, sys\nprint(os.getcwd(), os.listdir('.'), sys.flags.isolated, __name__)", FAST)
    assert result.status == "ok" and result.returncode == 0
    cwd, listing, isolated, name = result.stdout.split(" ", 3)
    assert Path(cwd).name == "work" and "dialogsim-sandbox-" in cwd
    assert not Path(cwd).exists()  # removed afterwards
    assert listing == "[]"  # the program file was deleted before the code ran
    assert (isolated, name.strip()) == ("1", "__sandbox__")


def test_an_infinite_loop_is_stopped_by_the_timeout() -> None:
    result = run_python("while True:\n    pass\n", SandboxLimits(timeout_seconds=1.0))
    assert result.status == "timeout" and result.returncode is None
    assert 1.0 <= result.seconds < 4.0


def test_a_sleeping_child_and_its_process_group_are_killed() -> None:
    result = run_python("import time\nprint('started', flush=True)\ntime.sleep(60)", SandboxLimits(timeout_seconds=1.0))
    assert result.status == "timeout" and result.stdout == "started\n" and result.seconds < 4.0


@pytest.mark.parametrize(
    "program",
    [
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)",
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=3)",
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
    ],
)
def test_network_calls_are_stopped(program: str) -> None:
    result = run_python(program, FAST)
    assert result.status == "blocked", result
    assert "SandboxViolation: socket." in result.stderr


@NAMESPACES
def test_without_the_audit_hook_the_network_namespace_still_has_no_route() -> None:
    result = run_python(
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)", SandboxLimits(audit_hook=False)
    )
    assert result.status == "error" and "Network is unreachable" in result.stderr
    assert result.seconds < 3.0  # refused at once, not a connect timeout


def test_memory_limit() -> None:
    result = run_python("blob = bytearray(2 * 1024**3)", SandboxLimits(memory_bytes=256 * 2**20))
    assert result.status == "memory_limit" and "MemoryError" in result.stderr


def test_writes_stay_in_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    inside = run_python("open('note.txt', 'w').write('x')\nprint(open('note.txt').read())", FAST)
    assert inside.status == "ok" and inside.stdout == "x\n"
    outside = run_python(f"open({str(target)!r}, 'w').write('x')", FAST)
    assert outside.status == "blocked" and not target.exists()
    removal = run_python(f"import os\nos.remove({str(tmp_path)!r})", FAST)
    assert removal.status == "blocked"


@NAMESPACES
def test_without_the_audit_hook_the_file_system_is_read_only(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')", SandboxLimits(audit_hook=False))
    assert result.status == "error" and "Read-only file system" in result.stderr
    assert not target.exists()


@pytest.mark.parametrize(
    ("program", "event"),
    [
        ("import os\nos.system('echo hi')", "os.system"),
        ("import subprocess\nsubprocess.run(['echo', 'hi'])", "_posixsubprocess"),
        ("import os\nos.fork()", "os.fork"),
        (f"import os\nos.kill({os.getpid()}, 0)", "os.kill"),
        ("import ctypes\nctypes.CDLL(None)", "ctypes"),
    ],
)
def test_processes_signals_and_ctypes_are_refused(program: str, event: str) -> None:
    result = run_python(program, FAST)
    assert result.status == "blocked" and event in result.stderr, result


def test_output_flood_is_capped() -> None:
    result = run_python("while True:\n    print('x' * 1000)", SandboxLimits(timeout_seconds=5.0, file_size_bytes=2**20))
    assert result.status == "output_limit"
    assert len(result.stdout) <= FAST.max_output_chars


def test_errors_and_limits_are_validated() -> None:
    assert run_python("raise ValueError('bad')", FAST).status == "error"
    assert run_python("def f(:\n", FAST).status == "error"
    with pytest.raises(ValueError, match="must be positive"):
        SandboxLimits(timeout_seconds=0)


def test_the_audit_hook_alone_stops_network_and_writes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The fallback level (no namespaces): no unshare prefix, no read-only mounts, the audit hook still guards."""
    monkeypatch.setattr(sandbox, "isolation_level", lambda: "audit-hook")
    network = run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)", FAST)
    assert (network.status, network.isolation) == ("blocked", "audit-hook")
    write = run_python(f"open({str(tmp_path / 'escaped.txt')!r}, 'w').write('x')", FAST)
    assert write.status == "blocked" and not (tmp_path / "escaped.txt").exists()
    assert run_python("open('inside.txt', 'w').write('x')", FAST).status == "ok"
