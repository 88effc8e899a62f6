#!/usr/bin/env bash
# The main job: one REFUEL iteration on the embedded default, then per-turn win rates vs π_0.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$(date +%s)
refuel-train --config configs/cpu_main.yaml "$@"
refuel-evaluate --config configs/cpu_eval.yaml
echo "main job wall time: $(( $(date +%s) - start )) s"
