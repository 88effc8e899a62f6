"""Smoke test of ``bench/``: every benchmark imports as a module of the ``bench`` package and prints its help."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import bench

SCRIPTS = sorted(module.name for module in pkgutil.iter_modules(bench.__path__) if module.name != "runs")


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_help_runs_in_process(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m bench.<script> --help``, in process: argparse's exit 0 with the usage line, nothing measured."""
    main = importlib.import_module(f"bench.{script}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
