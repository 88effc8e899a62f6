"""The code sandbox: untrusted programs run in a separate, limited process, reach no network and read no secrets."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from dialogsim.rewards import sandbox_child
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
def test_without_the_audit_hook_nothing_outside_the_folder_is_writable(tmp_path: Path) -> None:
    """The minimal root: a hidden folder (tmp_path), the interpreter's prefix and ``/`` itself all refuse writes."""
    targets = [str(tmp_path / "escaped.txt"), os.path.join(sys.prefix, "escaped.txt"), "/escaped.txt"]
    program = f"import errno\nfor path in {targets!r}:\n    try:\n        open(path, 'w')\n"
    program += "    except OSError as error:\n        print(errno.errorcode[error.errno])\n"
    result = run_python(program, SandboxLimits(audit_hook=False))
    assert result.status == "ok" and result.stdout.split() == ["ENOENT", "EROFS", "EROFS"], result.stdout
    assert not any(Path(target).exists() for target in targets)


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
    with pytest.raises(ValueError, match="choose from"):
        run_python("pass", FAST, isolation="containers")


def test_the_audit_hook_alone_stops_network_and_writes(tmp_path: Path) -> None:
    """The fallback level (no namespaces): no unshare prefix, no minimal root, the audit hook still guards."""
    network = run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)", FAST, "audit-hook")
    assert (network.status, network.isolation) == ("blocked", "audit-hook")
    write = run_python(f"open({str(tmp_path / 'escaped.txt')!r}, 'w').write('x')", FAST, "audit-hook")
    assert write.status == "blocked" and not (tmp_path / "escaped.txt").exists()
    assert run_python("open('inside.txt', 'w').write('x')", FAST, "audit-hook").status == "ok"


def test_changing_folder_does_not_open_a_way_out(tmp_path: Path) -> None:
    """Relative paths are checked against the folder, so ``chdir`` elsewhere must be refused (was allowed)."""
    result = run_python(f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w')", FAST, "audit-hook")
    assert result.status == "blocked" and "os.chdir" in result.stderr
    assert not (tmp_path / "escaped.txt").exists()


def test_a_program_cannot_fake_a_setup_failure() -> None:
    """Only the child's private status pipe reports setup failures (a reward of NaN instead of 0), not stderr."""
    program = "import sys\nprint('dialogsim-sandbox-setup-failed: mount', file=sys.stderr)\nsys.exit(121)"
    result = run_python(program, FAST)
    assert (result.status, result.returncode, result.setup_error) == ("error", 121, None)


def test_a_real_setup_failure_is_reported_through_the_status_pipe(tmp_path: Path) -> None:
    """The child itself, started with a minimal root it cannot mount: exit status and reason on the pipe."""
    (tmp_path / "program.py").write_text("print('never runs')")
    read_end, write_end = os.pipe()
    settings = {"program": "program.py", "new_root": str(tmp_path / "missing"), "status_fd": write_end}
    settings |= {"memory_bytes": 2**30, "cpu_seconds": 5, "file_size_bytes": 2**20, "audit_hook": True}
    command = [sys.executable, "-I", "-B", sandbox_child.__file__, json.dumps(settings)]
    child = subprocess.run(command, cwd=tmp_path, pass_fds=(write_end,), capture_output=True, text=True, check=False)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as status:
        reason = status.read().decode()
    assert child.returncode == sandbox_child.SETUP_FAILED and child.stdout == ""
    assert "mount('tmpfs'" in reason and "missing" in reason


def test_program_output_stays_out_of_the_result_repr() -> None:
    result = run_python("print('hf_not_for_logs')", FAST)
    assert result.stdout == "hf_not_for_logs\n" and "hf_not_for_logs" not in repr(result)


# --- reads: secrets of the user and of other processes ------------------------------------------------

LEVELS = [
    pytest.param("namespaces", True, marks=NAMESPACES, id="namespaces"),
    pytest.param("namespaces", False, marks=NAMESPACES, id="namespaces-without-audit-hook"),
    pytest.param("audit-hook", True, id="audit-hook"),
]
_ATTACKER = """
import json, sys
from dialogsim.rewards.sandbox import SandboxLimits, run_python
programs, level, audit_hook = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "True"
with open("/proc/self/environ", "rb") as handle:
    own_environment = handle.read().decode()
results = {
    name: [(result.status, result.stdout + result.stderr) for result in [run_python(program, SandboxLimits(
        timeout_seconds=10.0, audit_hook=audit_hook), level)]][0]
    for name, program in programs.items()
}
print(json.dumps({"own_environment": own_environment, "results": results}))
"""


def _read_secrets(home: Path, level: str, audit_hook: bool, secret: str) -> dict[str, tuple[str, str]]:
    """Run attacking programs from a parent whose environment, command line and ``home`` hold ``secret``.

    Returns ``{row: (status, stdout + stderr)}``: one row per way of reading the issue's table names.
    """
    programs = {
        "etc_passwd": "print(open('/etc/passwd').read())",
        "home_listing": f"import os\nprint(os.listdir({str(home)!r}), os.listdir({str(home / '.cache')!r}))",
        "dotfile": f"print(open({str(home / '.netrc')!r}).read())",
        "hf_token": f"print(open({str(home / '.cache' / 'huggingface' / 'token')!r}).read())",
        "parent_environ": "import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())",
        "parent_cmdline": "import os\nprint(open(f'/proc/{os.getppid()}/cmdline', 'rb').read())",
        "proc_listing": "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.getpid())",
        "every_process": (
            "import os\nfor pid in range(1, 2**16):\n    for name in ('environ', 'cmdline'):\n"
            "        try:\n            print(open(f'/proc/{pid}/{name}', 'rb').read())\n"
            "        except Exception:\n            pass\n"
        ),
    }
    environment = {"PATH": os.environ["PATH"], "HOME": str(home), "HF_TOKEN": secret, "OPENAI_API_KEY": secret}
    parent = subprocess.run(
        [sys.executable, "-c", _ATTACKER, json.dumps(programs), level, str(audit_hook), secret],
        cwd=Path(__file__).resolve().parents[1],  # imports this checkout's dialogsim
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(parent.stdout)
    assert secret in report["own_environment"]  # the parent really holds it where /proc shows it
    return {name: tuple(outcome) for name, outcome in report["results"].items()}


@pytest.mark.parametrize(("level", "audit_hook"), LEVELS)
def test_secrets_are_out_of_reach(tmp_path: Path, level: str, audit_hook: bool) -> None:
    """Each row of issue 17's table, plus an HF token planted in a temporary HOME: nothing comes back."""
    secret = f"hf_{secrets.token_hex(16)}"
    home = tmp_path / "home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(secret)
    (home / ".netrc").write_text(f"machine huggingface.co login me password {secret}\n")
    results = _read_secrets(home, level, audit_hook, secret)
    passwd_first_line = Path("/etc/passwd").read_text().splitlines()[0]
    for name, (_, output) in results.items():
        assert secret not in output and passwd_first_line not in output, name
    refused = "blocked" if audit_hook else "error"
    reads = ("etc_passwd", "home_listing", "dotfile", "hf_token", "parent_environ", "parent_cmdline")
    assert {name: results[name][0] for name in reads} == dict.fromkeys(reads, refused)
    assert "huggingface" not in results["home_listing"][1] and ".netrc" not in results["home_listing"][1]
    if audit_hook:
        assert results["proc_listing"][0] == "blocked"
    else:  # its own PID namespace: PID 1, alone
        assert results["proc_listing"] == ("ok", "[1] 1\n")


@NAMESPACES
def test_the_minimal_root_holds_only_the_interpreter_libraries_and_the_folder() -> None:
    """Without the audit hook: ``/`` and the real home show only what the interpreter needs; no ``/etc``."""
    home = Path.home()
    program = f"import json, os\nprint(json.dumps([os.listdir('/'), os.listdir({str(home)!r}), os.getuid()]))"
    result = run_python(f"{program}\nprint(os.path.exists('/etc'), os.getcwd())", SandboxLimits(audit_hook=False))
    assert result.status == "ok", result.stderr
    first, second = result.stdout.splitlines()
    top, in_home, uid = json.loads(first)
    needed = {Path(path).resolve() for path in (sys.prefix, sys.base_prefix)}
    on_the_way = {path.relative_to("/").parts[0] for path in needed}
    assert set(top) <= {"bin", "lib", "lib32", "lib64", "libx32", "usr", "proc", "tmp", *on_the_way}
    assert set(in_home) <= {path.relative_to(home).parts[0] for path in needed if path.is_relative_to(home)}
    assert uid == sandbox_child.SANDBOX_UID and second.startswith("False /")
