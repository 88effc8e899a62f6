"""A reward for ``Coding`` rows: run the row's reference tests on the code of the assistant's reply.

The shared prompt file's Coding rows (HumanEval, MBPP; see ``../shared/data/ultrainteract/SOURCE.md``)
hold in ``reference`` test code that runs after the candidate's function is defined: MBPP's
``assert f(...) == ...`` lines (plus any setup code), HumanEval's ``check`` function followed by
``check(<entry point>)``. The program ``imports of meta["prompt"] + extracted code + reference + a
random pass marker`` runs in :mod:`dialogsim.rewards.sandbox` (separate process, timeout, memory limit,
no network, temporary folder); it passes when it exits with status 0 and printed the marker, so code
that exits early (``sys.exit(0)``, ``os._exit``) before the tests does not pass.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from dialogsim.messages import Message
from dialogsim.prompts import PromptRow
from dialogsim.rewards.base import check_batch
from dialogsim.rewards.sandbox import SandboxLimits, run_python

logger = logging.getLogger(__name__)

CODE_TASK = "Coding"
_FENCED_BLOCK = re.compile(r"```[ \t]*(?P<language>[\w+-]*)[^\n]*\n(?P<code>.*?)```", re.DOTALL)
_PYTHON_LANGUAGES = frozenset({"", "python", "python3", "py"})
_IMPORT_LINE = re.compile(r"^(?:import|from)\s+\S+.*$", re.MULTILINE)


def extract_code(reply: str, entry_point: str | None = None) -> str | None:
    """The Python code of one reply: the last fenced block that defines ``entry_point``, else the last block.

    Fenced blocks are ```` ```python ```` / ```` ```py ```` / bare ```` ``` ```` blocks; blocks in other
    languages are ignored. An unterminated last fence (a reply cut at the token cap) still counts.

    Args:
        reply: one assistant message.
        entry_point: name of the function the tests call (``row.meta["entry_point"]``), if known.

    Returns:
        The code (without the fences), or ``None`` when the reply has no Python block.
    """
    text = reply if reply.count("```") % 2 == 0 else reply + "\n```"
    blocks = [
        match.group("code")
        for match in _FENCED_BLOCK.finditer(text)
        if match.group("language").lower() in _PYTHON_LANGUAGES and match.group("code").strip()
    ]
    if not blocks:
        return None
    if entry_point:
        defining = [block for block in blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", block)]
        if defining:
            return defining[-1]
    return blocks[-1]


def build_test_program(code: str, row: PromptRow, marker: str) -> str:
    """The program run in the sandbox: the prompt's import lines, ``code``, ``row.reference``, ``print(marker)``.

    The import lines of ``row.meta["prompt"]`` (HumanEval's ``from typing import List`` and the like) come
    first, because replies often repeat the typed signature without its imports.
    """
    prompt = row.meta.get("prompt")
    imports = "\n".join(_IMPORT_LINE.findall(prompt)) if isinstance(prompt, str) else ""
    return f"{imports}\n\n{code}\n\n{row.reference}\n\nprint({marker!r})\n"


class CodeTestReward:
    """Pass/fail of the reference tests on the latest code of the dialogue (implements ``RewardModel``).

    ``r(τ) = 1.0`` if the row's reference tests pass on the code of the most recent assistant message
    that contains a Python block (so a later explanation without code keeps the earlier code), else
    ``0.0``. Why a program did not pass is counted in :attr:`outcomes`: ``"passed"``, ``"no_code"``,
    ``"failed"`` (a test or the code raised), ``"timeout"``, ``"memory_limit"``, ``"output_limit"``,
    ``"blocked"`` (network, processes, writes outside the folder).

    NaN, with the reason counted in :attr:`failures`: ``"unsupported_task:<task>"`` (task not
    ``"Coding"``), ``"no_reference"``, ``"no_assistant_reply"``, ``"sandbox_setup_failed"`` (the sandbox,
    not the code, failed).

    Args:
        limits: sandbox limits per program (default: 10 s, 512 MiB).
        workers: programs run at the same time (threads that each wait on one child process).
    """

    def __init__(self, limits: SandboxLimits | None = None, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"CodeTestReward: workers must be >= 1, got {workers}")
        self.limits = limits or SandboxLimits()
        self.workers = workers
        self.failures: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def score(self, dialogues: list[list[Message]], rows: list[PromptRow]) -> list[float]:
        """One reward per dialogue (see the class docstring); programs run ``workers`` at a time.

        Raises:
            ValueError: ``dialogues`` and ``rows`` differ in length.
        """
        check_batch(dialogues, rows, "CodeTestReward")
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(self._run_one, dialogues, rows))
        for reward, label in results:
            (self.failures if math.isnan(reward) else self.outcomes)[label] += 1
        return [reward for reward, _ in results]

    def _run_one(self, dialogue: list[Message], row: PromptRow) -> tuple[float, str]:
        """``(reward, label)``: label is a NaN reason when the reward is NaN, else the outcome."""
        replies = [message["content"] for message in dialogue if message["role"] == "assistant"]
        reason = _failure_reason(replies, row)
        if reason is not None:
            return float("nan"), reason
        entry_point = row.meta.get("entry_point")
        code = next((c for reply in reversed(replies) if (c := extract_code(reply, entry_point)) is not None), None)
        if code is None:
            return 0.0, "no_code"
        marker = f"dialogsim-tests-passed-{secrets.token_hex(8)}"
        result = run_python(build_test_program(code, row, marker), self.limits)
        if result.status == "setup_failed":
            # the sandbox's own reason; what the program printed is never logged (it may hold what it read)
            logger.warning("code sandbox setup failed: %s", result.setup_error)
            return float("nan"), "sandbox_setup_failed"
        if result.status == "ok" and marker in result.stdout.splitlines():
            return 1.0, "passed"
        return 0.0, "failed" if result.status in ("ok", "error") else result.status


def _failure_reason(replies: list[str], row: PromptRow) -> str | None:
    if row.task != CODE_TASK:
        return f"unsupported_task:{row.task}"
    if not row.reference:
        return "no_reference"
    if not replies:
        return "no_assistant_reply"
    return None
