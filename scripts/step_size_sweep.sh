#!/usr/bin/env bash
# The step-size sweep of issue 26, item 4: held-out accuracy against pairs trained, on the one-turn version of the
# arithmetic dialogues (README "Step-size sweep"). For every config below, in order:
#   1. refuel-train --config configs/arithmetic/train.yaml --max_horizon 1: 3 iterations of 128 on-policy pairs,
#      seed 0 (the same π_0 collection at iteration 0 for every config), so π_1, π_2, π_3 were trained on 128, 256,
#      384 pairs (96 / 192 / 288 after the 25 % validation split; 2 epochs each, so 24 steps per iteration);
#   2. refuel-evaluate --config configs/arithmetic/eval.yaml --horizon 1: π_1, π_2, π_3 against π_0 on all 500
#      held-out rows, judge = the training reward (turn_answer); π_0's dialogues are generated once and copied into
#      every later config's cache (the cache key covers the weights and the generation settings, not the folder);
#   3. python scripts/step_size_sweep.py: the table (accuracy at h = 1, win rate vs π_0 with 95 % intervals,
#      validation sign agreement, r − r' spread, reply tokens) → <out>/summary.md.
#
# Usage:
#   bash scripts/step_size_sweep.sh                   # every config, in the background; log <out>/sweep.log
#   bash scripts/step_size_sweep.sh ft_lr1e-5_eta10   # only the named configs
#   SWEEP_FOREGROUND=1 bash scripts/step_size_sweep.sh   # in this shell
#   SWEEP_DIR=runs/sweep-2 bash scripts/step_size_sweep.sh   # another output folder (default runs/sweep)
# The same command resumes after a kill: a config whose evaluation finished is skipped, refuel-train resumes its
# finished iterations, collection shards and checkpoints, refuel-evaluate reuses its cached dialogues.
# Measured (2026-12-07, 2 Sapphire Rapids cores): about 11 min per config, of which the evaluation is about 2.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Training on one thread unless told otherwise: on 2 cores that a test run shares, 2 threads slowed a step from
# 3.5 s to 22-54 s (each parallel region waits for the thread that lost its core); one thread keeps its own.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# "<name> <refuel-train flags>": run in this order. Everything else comes from configs/arithmetic/train.yaml
# (fp32, 2 epochs, batches of 4 × 2 accumulation, 96-token replies, temperature 0.8).
configs=(
  "ft_lr1e-5_eta10 --learning_rate 1e-5 --eta 10"
  "ft_lr3e-5_eta10 --learning_rate 3e-5 --eta 10"
  "ft_lr3e-6_eta10 --learning_rate 3e-6 --eta 10"
  "lora16_lr1e-4_eta10 --lora_r 16 --lora_alpha 32 --learning_rate 1e-4 --eta 10"
  "ft_lr1e-5_eta30 --learning_rate 1e-5 --eta 30"
)
out=${SWEEP_DIR:-runs/sweep}
prompts=runs/arithmetic/prompts.jsonl
log="$out/sweep.log"
mkdir -p "$out"

if [[ ${SWEEP_FOREGROUND:-0} != 1 ]]; then
  SWEEP_FOREGROUND=1 setsid nohup bash "$0" "$@" >>"$log" 2>&1 </dev/null &
  echo "sweep started in the background (process group $!); log: $log"
  echo "follow it with: tail -f $log; after a kill, run the same command again to resume"
  exit 0
fi

source scripts/stages.sh
take_lock "$out" sweep

if [[ ! -f $prompts ]]; then
  stage generate-prompts python -m dialogsim.arithmetic --output "$prompts"
fi
selected=("$@")
names=()
for entry in "${configs[@]}"; do
  read -r name flags <<<"$entry"
  if ((${#selected[@]})) && [[ " ${selected[*]} " != *" $name "* ]]; then
    continue
  fi
  names+=("$name")
  run="$out/$name"
  if [[ -f $run/eval/done ]]; then
    echo "=== $name: finished earlier, skipped"
    continue
  fi
  # shellcheck disable=SC2086  # flags: several words on purpose
  stage "train-$name" refuel-train --config configs/arithmetic/train.yaml --max_horizon 1 --pairs_per_iteration 128 \
    --iterations 3 --backend vllm --seed 0 $flags --output_dir "$run"
  mkdir -p "$run/eval/dialogues"
  for cached in "$out"/*/eval/dialogues/smollm2-135m-instruct-*.jsonl; do  # π_0's dialogues, if any config has them
    if [[ -f $cached && ! -e $run/eval/dialogues/$(basename "$cached") ]]; then
      cp "$cached" "$run/eval/dialogues/"
    fi
  done
  stage "evaluate-$name" refuel-evaluate --config configs/arithmetic/eval.yaml --horizon 1 --backend vllm \
    --candidates "$run"/iteration_{0,1,2}/policy --output_dir "$run/eval"
  touch "$run/eval/done"
done
python scripts/step_size_sweep.py --sweep_dir "$out" --prompts "$prompts" --configs "${names[@]}" | tee "$out/summary.md"
echo "=== $(date -Is) sweep done: $out/summary.md"
