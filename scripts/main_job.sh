#!/usr/bin/env bash
# The main job: one REFUEL iteration on the embedded default, then per-turn win rates vs π_0.
# BACKEND=vllm runs the policy on vLLM in both steps; further flags go to refuel-train.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
backend=${BACKEND:-transformers}
start=$(date +%s)
refuel-train --config configs/cpu_main.yaml --backend "$backend" "$@"
refuel-evaluate --config configs/cpu_eval.yaml --backend "$backend"
echo "main job wall time: $(( $(date +%s) - start )) s"
