"""Run files written atomically keep the permissions a plain ``open(..., "w")`` would give them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from refuel.storage import read_rows, write_json, write_rows


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_files_get_umask_permissions_not_0600(tmp_path: Path, umask_022: None) -> None:
    """write_json / write_rows give 0644 under umask 022 (mkstemp's 0600 made runs unreadable to others),
    follow a stricter umask, and leave no staging file behind."""
    assert _mode(write_json({"eta": 10.0}, tmp_path / "config.json")) == 0o644
    assert _mode(write_rows([{"prompt_id": "a", "reward": 1.0}], tmp_path / "pairs.jsonl")) == 0o644
    assert read_rows(tmp_path / "pairs.jsonl") == [{"prompt_id": "a", "reward": 1.0}]
    os.umask(0o077)
    assert _mode(write_json({"eta": 1.0}, tmp_path / "config.json")) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "pairs.jsonl"]
