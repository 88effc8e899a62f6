"""Policy labels from the run's metadata (config.json, metrics.json), not from folder names."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import pytest

from refuel.config import RefuelConfig
from refuel.evaluation.policy_names import policy_labels, policy_origin
from refuel.storage import write_json

PI_0 = "smollm2-135m-instruct"


def trained_policy(run: Path, iteration: int, **settings: object) -> str:
    """The files `refuel-train` leaves for iteration t: config.json, iteration_<t>/metrics.json, policy/."""
    write_json(asdict(RefuelConfig(output_dir=str(run), policy_model=PI_0, **settings)), run / "config.json")
    iteration_dir = run / f"iteration_{iteration}"
    (iteration_dir / "policy").mkdir(parents=True)
    write_json({"iteration": iteration, "pairs": 32}, iteration_dir / "metrics.json")
    return str(iteration_dir / "policy")


def test_labels_name_method_and_iteration_from_the_run_metadata(tmp_path: Path) -> None:
    refuel_1 = trained_policy(tmp_path / "refuel", 0)
    refuel_2 = trained_policy(tmp_path / "refuel", 1)
    rebel = trained_policy(tmp_path / "rebel", 0, method="rebel_lt")
    dpo = trained_policy(tmp_path / "dpo", 0, method="dpo_lt")
    reference = trained_policy(tmp_path / "rollin", 0, rollin="initial")
    labels = policy_labels([PI_0, refuel_1, refuel_2, rebel, dpo, reference])
    assert labels == {
        PI_0: "π_0",
        refuel_1: "REFUEL π_1",
        refuel_2: "REFUEL π_2",
        rebel: "REBEL-LT π_1",
        dpo: "DPO-LT π_1",
        reference: "REFUEL π_1 (roll-in initial)",
    }


def test_the_iteration_comes_from_metrics_json_not_the_folder_name(tmp_path: Path) -> None:
    policy = Path(trained_policy(tmp_path / "run", 0))
    renamed = policy.parent.rename(tmp_path / "run" / "best")
    assert policy_labels([str(renamed / "policy")]) == {str(renamed / "policy"): "REFUEL π_1"}


def test_equal_labels_get_their_folder_names(tmp_path: Path) -> None:
    first, second = trained_policy(tmp_path / "seed-0", 0), trained_policy(tmp_path / "seed-1", 0)
    assert policy_labels([PI_0, first, second]) == {
        PI_0: "π_0",
        first: "REFUEL π_1 (seed-0/iteration_0)",
        second: "REFUEL π_1 (seed-1/iteration_0)",
    }


def test_policies_without_run_metadata_keep_their_folder_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bare = tmp_path / "exported" / "iteration_0" / "policy"
    bare.mkdir(parents=True)
    broken = Path(trained_policy(tmp_path / "broken", 0))
    (broken.parent / "metrics.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="refuel.evaluation.policy_names"):
        labels = policy_labels(["HuggingFaceTB/SmolLM2-360M-Instruct", str(bare), str(broken)])
    assert labels == {
        "HuggingFaceTB/SmolLM2-360M-Instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",  # path parts until distinct
        str(bare): "exported/iteration_0",
        str(broken): "broken/iteration_0",
    }
    assert policy_origin(str(bare)) is None and "run metadata unreadable" in caplog.text


def test_a_policy_listed_twice_is_rejected(tmp_path: Path) -> None:
    policy = trained_policy(tmp_path / "run", 0)
    with pytest.raises(ValueError, match="evaluated once"):
        policy_labels([policy, policy])
