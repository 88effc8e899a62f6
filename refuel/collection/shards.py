"""Crash-safe pair collection on disk: one atomically written shard per batch, listed in a manifest.

Layout of one iteration's collection folder::

    <folder>/manifest.json       settings fingerprint and, per finished batch, its shard file, drops, sources
                                 and collection seconds
    <folder>/shard-<b>.jsonl     the kept pairs of batch b (absent when every pair of the batch was dropped),
                                 one :class:`~refuel.pairs.Pair` a line (schema :data:`~refuel.pairs.PAIR_FEATURES`)

A batch counts as done only once the manifest lists it; the manifest is rewritten atomically after
the shard is in place. A process killed at any point (SIGKILL included) therefore leaves either a
listed, complete shard or an unlisted batch, which a restart runs again; because batch b is
seeded from ``(seed, b)`` alone (:func:`refuel.collection.collect.iter_pair_batches`), the re-run gives the same
pairs, so nothing is lost or duplicated.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, cast

from refuel.collection.collect import CollectionResult
from refuel.pairs import PAIR_FEATURES, Pair
from refuel.storage import read_rows, write_json, write_rows

MANIFEST = "manifest.json"


class ShardMismatchError(RuntimeError):
    """The folder holds shards collected with other settings."""


class PairShards:
    """The shards of one collection run in ``folder``, tied to a fingerprint of its settings.

    Args:
        folder: the collection folder (created on first write).
        settings: fingerprint of everything that shapes the pairs (config, policy, seed).

    Raises:
        ShardMismatchError: ``folder`` already holds a manifest written with other settings.
    """

    def __init__(self, folder: Path, settings: str) -> None:
        self.folder = folder
        self.settings = settings
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        if not path.exists():
            return {"settings": self.settings, "batches": {}}
        manifest = json.loads(path.read_text())
        if manifest.get("settings") != self.settings:
            raise ShardMismatchError(
                f"{self.folder} holds pairs collected with other settings ({manifest.get('settings')} != "
                f"{self.settings}); use a new --output_dir, or delete that folder to collect again"
            )
        return manifest

    def done(self) -> frozenset[int]:
        """Indices of the batches already on disk."""
        return frozenset(int(index) for index in self.manifest["batches"])

    def write(self, index: int, batch: CollectionResult, seconds: float = 0.0) -> None:
        """Store batch ``index`` and the ``seconds`` it took: its shard first (atomic), then the manifest entry."""
        entry: dict[str, Any] = {
            "seconds": seconds,
            "pairs": len(batch.pairs),
            "dropped": dict(batch.dropped),
            "sources": dict(batch.sources),
            "file": None,
        }
        if batch.pairs:
            entry["file"] = f"shard-{index:05d}.jsonl"
            write_rows(batch.pairs, self.folder / entry["file"], PAIR_FEATURES)
        self.manifest["batches"][str(index)] = entry
        write_json(self.manifest, self.folder / MANIFEST)

    def seconds(self) -> float:
        """Collection time of the batches on disk, summed over every run that wrote some (seconds)."""
        return sum(entry.get("seconds", 0.0) for entry in self.manifest["batches"].values())

    def read(self) -> CollectionResult:
        """All stored pairs in batch order, and the summed drop counts.

        Raises:
            ShardMismatchError: a listed shard is missing or holds another number of pairs.
        """
        result = CollectionResult()
        for index in sorted(self.done()):
            entry = self.manifest["batches"][str(index)]
            result.dropped.update(Counter(entry["dropped"]))
            result.sources.update(Counter(entry["sources"]))
            if entry["file"] is None:
                continue
            rows = read_rows(self.folder / entry["file"], PAIR_FEATURES)
            if len(rows) != entry["pairs"]:
                raise ShardMismatchError(
                    f"{self.folder / entry['file']} holds {len(rows)} pairs, the manifest lists {entry['pairs']}; "
                    "the folder was edited by hand: delete it to collect again"
                )
            result.pairs += [cast(Pair, row) for row in rows]
        return result
