#!/usr/bin/env bash
# The main job: one REFUEL iteration, then per-turn win rates vs π_0 on held-out dialogues.
#   TASK=arithmetic (default): the arithmetic dialogues (configs/arithmetic/main.yaml, main_eval.yaml), generated
#                              here first; user turns replayed from data, reward turn_answer.
#   TASK=gsm8k:                real GSM8K Math_CoT prompts from ../shared with the simulated-user LLM
#                              (configs/cpu_main.yaml, cpu_eval.yaml), reward math_format.
# Policy and simulated user run on one vLLM engine per step (measured faster end to end: README "Measured
# here"); BACKEND=transformers runs both on transformers. Further flags go to refuel-train.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
backend=${BACKEND:-vllm}
task=${TASK:-arithmetic}
start=$(date +%s)
case $task in
  arithmetic)
    train=configs/arithmetic/main.yaml
    evaluation=configs/arithmetic/main_eval.yaml
    prompts=runs/main-arithmetic/prompts.jsonl
    if [[ ! -f $prompts ]]; then
      python -m dialogsim.arithmetic --output "$prompts"
    fi
    ;;
  gsm8k)
    train=configs/cpu_main.yaml
    evaluation=configs/cpu_eval.yaml
    ;;
  *)
    echo "error: TASK must be arithmetic or gsm8k, got '$task'" >&2
    exit 2
    ;;
esac
refuel-train --config "$train" --backend "$backend" "$@"
refuel-evaluate --config "$evaluation" --backend "$backend"
echo "main job wall time: $(($(date +%s) - start)) s"
