"""Crash-safe collection: shards and manifest, a mismatched folder, and a real SIGKILL in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from refuel.collection.collect import CollectionResult
from refuel.collection.shards import MANIFEST, PairShards, ShardMismatchError
from refuel.pairs import Pair
from refuel.storage import read_rows


def _pair(index: int) -> Pair:
    """A one-turn pair of prompt ``p<index>`` with reward ``index``."""
    dialogue = [{"role": "user", "content": f"Question {index}?"}, {"role": "assistant", "content": "Yes."}]
    no = [dialogue[0], {"role": "assistant", "content": "No."}]
    return Pair(
        prompt_id=f"p{index}",
        turn=1,
        horizon=1,
        reset_source="current",
        offline_id="",
        snapshot_json="{}",
        dialogue=dialogue,
        dialogue_prime=no,
        reward=float(index),
        reward_prime=0.0,
        prompt_token_ids=[1, 2],
        token_ids=[3],
        token_ids_prime=[4],
    )


def _batch(pairs: int, dropped: int = 0) -> CollectionResult:
    return CollectionResult(
        pairs=[_pair(i) for i in range(pairs)],
        dropped=Counter({"identical_replies": dropped}),
    )


def test_batches_are_listed_only_once_written_and_read_back_in_order(tmp_path: Path) -> None:
    """done() lists written batches; read() returns their pairs in batch order and sums the drops."""
    shards = PairShards(tmp_path, "settings-a")
    assert shards.done() == frozenset()
    shards.write(1, _batch(2, dropped=1))
    shards.write(0, _batch(1))
    shards.write(2, _batch(0, dropped=3))  # every pair dropped: no shard file, still done
    again = PairShards(tmp_path, "settings-a")
    assert again.done() == {0, 1, 2}
    result = again.read()
    assert [p["prompt_id"] for p in result.pairs] == ["p0", "p0", "p1"]
    assert result.pairs == [_pair(0), _pair(0), _pair(1)]  # the Pair schema survives the round trip
    assert result.dropped["identical_replies"] == 4
    assert sorted(f.name for f in tmp_path.iterdir()) == [MANIFEST, "shard-00000.jsonl", "shard-00001.jsonl"]


def test_a_folder_from_other_settings_is_refused(tmp_path: Path) -> None:
    """Resuming into shards collected with other settings names the folder and the fix."""
    PairShards(tmp_path, "settings-a").write(0, _batch(1))
    with pytest.raises(ShardMismatchError, match=r"other settings.*new --output_dir"):
        PairShards(tmp_path, "settings-b")


def test_a_shard_edited_by_hand_is_detected(tmp_path: Path) -> None:
    """A listed shard with fewer rows than the manifest says is an error, not silently fewer pairs."""
    PairShards(tmp_path, "s").write(0, _batch(2))
    path = tmp_path / "shard-00000.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    with pytest.raises(ShardMismatchError, match="holds 1 pairs, the manifest lists 2"):
        PairShards(tmp_path, "s").read()


def _train_command(output_dir: Path, tiny_model_path: str, shared_prompts: Path) -> list[str]:
    return [
        sys.executable, "-m", "refuel.training.iterations",
        "--output_dir", str(output_dir),
        "--policy_model", tiny_model_path,
        "--user_model", tiny_model_path,
        "--prompts", str(shared_prompts),
        "--holdout", "0",
        "--pairs_per_iteration", "8",
        "--generation_batch_size", "2",
        "--max_horizon", "2",
        "--max_new_tokens", "8",
        "--max_prompt_tokens", "100",
        "--per_device_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--validation_fraction", "0.25",
    ]  # fmt: skip


def _run(command: list[str]) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("ref_")} for row in rows]


@pytest.mark.slow
def test_sigkill_during_collection_then_resume_gives_the_uninterrupted_pairs(
    tmp_path: Path, tiny_model_path: str, shared_prompts: Path
) -> None:
    """Kill -9 once a batch is on disk; the same command resumes and ends with the same pairs, none twice."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _run(_train_command(reference, tiny_model_path, shared_prompts))
    command = _train_command(killed, tiny_model_path, shared_prompts)
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = killed / "iteration_0" / "shards" / MANIFEST
    deadline = time.monotonic() + 300
    while not (manifest.exists() and json.loads(manifest.read_text())["batches"]):
        assert process.poll() is None, "the run ended before any batch was on disk"
        assert time.monotonic() < deadline, "no batch was written within 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    on_disk = len(json.loads(manifest.read_text())["batches"])
    assert on_disk < 4 and not (killed / "iteration_0" / "pairs.jsonl").exists(), "killed mid-collection"
    _run(command)
    expected = _comparable(read_rows(reference / "iteration_0" / "pairs.jsonl"))
    resumed = _comparable(read_rows(killed / "iteration_0" / "pairs.jsonl"))
    assert resumed == expected and len({row["snapshot_json"] for row in resumed}) == len(resumed)
    collection = json.loads((killed / "iteration_0" / "collection.json").read_text())
    assert collection["dropped"] == json.loads((reference / "iteration_0" / "collection.json").read_text())["dropped"]


def test_collection_seconds_add_up_over_resumed_runs(tmp_path: Path) -> None:
    """A run that collected batch 0 in 2 s, killed, then a resume that collected batch 1 in 3 s: 5 s in all."""
    PairShards(tmp_path, "s").write(0, _batch(1), seconds=2.0)
    resumed = PairShards(tmp_path, "s")
    resumed.write(1, _batch(1), seconds=3.0)
    assert resumed.seconds() == 5.0 and PairShards(tmp_path, "s").seconds() == 5.0
