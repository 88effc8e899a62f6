#!/usr/bin/env bash
# Does it learn on an LLM? (issue 13 item 3.) From the same π_0 (SmolLM2-135M-Instruct) and under one budget:
#   1. REFUEL, REBEL-LT and DPO-LT, 2 iterations of 256 pairs each (configs/experiment/train.yaml: reward
#      math_format, fp32, shared-prefix pairs, 64-token replies, 1 epoch; see Sizing below);
#   2. every policy (REFUEL π_1 and π_2, REBEL-LT and DPO-LT after their 2nd iteration) against π_0 on the 200
#      held-out GSM8K prompts, H = 3, judged by the training reward (configs/experiment/eval.yaml): the paper's
#      method × turn table with 95 % intervals, the per-turn diagnostics, plots, an HTML report;
#   3. python -m refuel.analysis: the table, the diagnostics, the validation sign agreement per iteration, the
#      spread of r − r' and what the policy can influence, measured speeds → <out>/summary.json, summary.md.
#
# Usage:
#   bash scripts/experiment.sh            # full run, in the background; log in runs/experiment/experiment.log
#   bash scripts/experiment.sh --smoke    # 1 iteration of 16 pairs, 8 prompts: measures the speeds for sizing
#   BACKEND=transformers bash scripts/experiment.sh  # policy engine of training and evaluation (default vllm)
#   USER_BACKEND=transformers ...                    # simulated-user engine (default auto: the policy's kind)
#   EXPERIMENT_LOCK=/tmp/cpu.lock bash scripts/...   # the background job waits for this lock (shared machines)
#   EXPERIMENT_FOREGROUND=1 bash scripts/...         # run in this shell instead
# Flags after the script name (and --smoke) go to every refuel-train call. The same command resumes after a
# kill: finished methods and the finished evaluation are skipped, refuel-train resumes its finished
# iterations, collection shards and training checkpoints, refuel-evaluate reuses its cached dialogues.
#
# Sizing (README "Does it learn on an LLM?", Sizing). Budget of the full run, the issue's floor:
#   collection: REFUEL 2 × 256 + REBEL-LT 2 × 256 + DPO-LT 2 × 256 = 1536 pairs;
#   training:   6 iterations × (π_t log-probs on 256 pairs, validation on 64 before and after, 24 steps of 8 pairs);
#   evaluation: 5 policies (π_0 + 4) × 200 prompts = 1000 dialogues of H = 3.
# Cut from the main job's settings to approach 2 h: 64-token replies, 1 epoch, collection batches of 128 pairs,
# one vLLM engine for π_t and the simulated user (BACKEND=transformers for both on transformers). Measured
# (2026-11-30): REFUEL collection of 256 pairs ≈ 3 min alone on the cores; a training iteration ≈ 25 min alone
# (compute-bound fp32 steps of ≈ 33 s, with other jobs sharing the cores). Alone on the cores, on a fresh clone, the
# full run took 98 min (README "Results of record"): ≈ 12.5–15 min per iteration, steps of ≈ 12 s.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

mode_flags=()
if [[ ${1:-} == --smoke ]]; then
  mode_flags=(--smoke)
  shift
fi
backend=${BACKEND:-vllm}
user_backend=${USER_BACKEND:-auto}  # auto: the policy's engine kind (on vLLM the user shares the policy engine)
if ((${#mode_flags[@]})); then
  out=${EXPERIMENT_DIR:-runs/experiment-smoke}
  iterations=1
  pairs=${SMOKE_PAIRS:-16}  # one collection batch of 2 × 16 conversations: the full run's per-call batch (32)
  prompts=${SMOKE_PROMPTS:-8}
  sizing=(--generation_batch_size "$pairs")
else
  out=${EXPERIMENT_DIR:-runs/experiment}
  iterations=2
  pairs=256
  prompts=200
  sizing=()
fi
judge_dir="$out/eval/reward-math_format"  # refuel-evaluate's folder for judge reward + reward math_format
log="$out/experiment.log"
mkdir -p "$out"

if [[ ${EXPERIMENT_FOREGROUND:-0} != 1 ]]; then
  command=(bash "$0" "${mode_flags[@]}" "$@")
  if [[ -n ${EXPERIMENT_LOCK:-} ]]; then
    command=(flock "$EXPERIMENT_LOCK" "${command[@]}")
  fi
  EXPERIMENT_FOREGROUND=1 BACKEND="$backend" USER_BACKEND="$user_backend" setsid nohup "${command[@]}" >>"$log" 2>&1 </dev/null &
  echo "experiment started in the background (process group $!); log: $log"
  echo "follow it with: tail -f $log; after a kill, run the same command again to resume"
  exit 0
fi

exec 9>"$out/.running"
if ! flock -n 9; then
  echo "another experiment is running in $out (lock $out/.running); wait for it or kill it first" >&2
  exit 1
fi

# stage NAME COMMAND...: run COMMAND and append its wall time (seconds) to <out>/timings.tsv
stage() {
  local name=$1 started
  shift
  started=$(date +%s)
  echo "=== $(date -Is) $name: $*"
  "$@"
  printf '%s\t%s\t%s\n' "$name" "$(($(date +%s) - started))" "$(date -Is)" >>"$out/timings.tsv"
}

echo "=== $(date -Is) experiment in $out: policy engine $backend, user engine $user_backend, $iterations iteration(s) of $pairs pairs, $prompts prompts"
last=$((iterations - 1))
engines=(--backend "$backend" --user_backend "$user_backend")
train=(--config configs/experiment/train.yaml "${engines[@]}" --iterations "$iterations"
  --pairs_per_iteration "$pairs" "${sizing[@]}")
# evaluate CANDIDATE...: every candidate against π_0 on the held-out prompts. Each policy's dialogues are cached
# in $out/eval/dialogues, so a later call with more candidates generates only the new ones.
evaluate() {
  refuel-evaluate --config configs/experiment/eval.yaml "${engines[@]}" --n_prompts "$prompts" \
    --output_dir "$out/eval" --candidates "$@"
}
refuel_policies=()
for ((t = 0; t < iterations; t++)); do
  refuel_policies+=("$out/refuel/iteration_$t/policy")
done
evaluated="$out/eval/.all-methods" # written when the evaluation of every method has ended
for method in refuel rebel_lt dpo_lt; do
  if [[ -f $out/$method/iteration_$last/policy/config.json ]]; then
    echo "=== $method: all $iterations iteration(s) trained, skipped"
  else
    stage "train-$method" refuel-train "${train[@]}" --method "$method" --output_dir "$out/$method" "$@"
  fi
  # REFUEL's policies are evaluated as soon as they exist: its table can be read while the baselines train.
  if [[ $method == refuel && ! -f $evaluated ]]; then
    stage evaluate-refuel evaluate "${refuel_policies[@]}"
    python -m refuel.analysis --run_dir "$out" --eval_dir "$judge_dir" --methods refuel
  fi
done

if [[ -f $evaluated ]]; then
  echo "=== evaluation of every method done ($judge_dir/report.html), skipped"
else
  stage evaluate evaluate "${refuel_policies[@]}" "$out/rebel_lt/iteration_$last/policy" \
    "$out/dpo_lt/iteration_$last/policy"
  touch "$evaluated"
fi

python -m refuel.analysis --run_dir "$out" --eval_dir "$judge_dir" --methods refuel rebel_lt dpo_lt
echo "=== $(date -Is) experiment done: $out/summary.md"
