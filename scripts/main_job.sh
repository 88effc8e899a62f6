#!/usr/bin/env bash
# The main job: one REFUEL iteration on the embedded default, then per-turn win rates vs π_0.
# Policy and simulated user run on one vLLM engine per step (measured faster end to end: README "Measured
# here"); BACKEND=transformers runs both on transformers. Further flags go to refuel-train.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
backend=${BACKEND:-vllm}
start=$(date +%s)
refuel-train --config configs/cpu_main.yaml --backend "$backend" "$@"
refuel-evaluate --config configs/cpu_eval.yaml --backend "$backend"
echo "main job wall time: $(( $(date +%s) - start )) s"
