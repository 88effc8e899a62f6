#!/usr/bin/env bash
# REFUEL vs the paper's last-turn baselines (REBEL-LT, DPO-LT): each trained from the same π_0 with the same
# budget (configs/cpu_main.yaml: pairs, epochs, batch, learning rate), then per-turn win rates of all three
# against π_0 on the held-out prompts, in one table (method × turn) and one plot.
# Flags after the script name go to every refuel-train call, e.g. --pairs_per_iteration 16.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out="${COMPARE_DIR:-runs/compare}"
start=$(date +%s)
for method in refuel rebel_lt dpo_lt; do
  refuel-train --config configs/cpu_main.yaml --method "$method" --output_dir "$out/$method" "$@"
done
refuel-evaluate --config configs/cpu_eval.yaml --output_dir "$out/eval" \
  --candidates "$out/refuel/iteration_0/policy" "$out/rebel_lt/iteration_0/policy" "$out/dpo_lt/iteration_0/policy"
echo "comparison wall time: $(( $(date +%s) - start )) s"
