#!/usr/bin/env bash
# Does it learn on an LLM? From the same π_0 (SmolLM2-135M-Instruct) and under one budget, on one of two tasks
# (TASK=gsm8k, the default, issue 13 item 3; TASK=arithmetic, issue 26):
#   1. REFUEL, REBEL-LT and DPO-LT, 2 iterations of 256 pairs each (arithmetic: REFUEL with two seeds);
#   2. every policy (REFUEL π_1 and π_2, the others after their 2nd iteration) against π_0 on the held-out prompts,
#      H = 3, judged by the training reward: the paper's method × turn table with 95 % intervals, the per-turn
#      diagnostics (accuracy per turn included), plots, an HTML report;
#   3. python -m refuel.evaluation.analysis: the table, the diagnostics, the validation sign agreement per iteration, the
#      spread of r − r' and what the policy can influence, measured speeds → <out>/summary.json, summary.md.
#
# The tasks (configs/<experiment|arithmetic>/train.yaml and eval.yaml):
#   gsm8k       200 held-out GSM8K prompts, simulated user (student template), reward math_format, lr 1e-6,
#               64-token replies, 1 epoch (see Sizing below); out runs/experiment.
#   arithmetic  the arithmetic dialogues (python -m dialogsim.arithmetic, data/arithmetic.md; generated into
#               <out>/prompts.jsonl first: 5,000 training and 500 held-out dialogues, no shared question), user turns
#               replayed from each row's script, reward turn_answer, lr 1e-5, η 10, 96-token replies, 2 epochs
#               (48 steps per iteration); out runs/arithmetic.
#
# Usage:
#   bash scripts/experiment.sh            # full run, in the background; log in <out>/experiment.log
#   TASK=arithmetic bash scripts/experiment.sh
#   bash scripts/experiment.sh --smoke    # 1 iteration of 16 pairs, 8 prompts: measures the speeds for sizing
#   BACKEND=transformers bash scripts/experiment.sh  # policy engine of training and evaluation (default vllm)
#   USER_BACKEND=transformers ...                    # simulated-user engine (default auto: the policy's kind)
#   EXPERIMENT_LOCK=/tmp/cpu.lock bash scripts/...   # the background job waits for this lock (shared machines)
#   EXPERIMENT_FOREGROUND=1 bash scripts/...         # run in this shell instead
# Flags after the script name (and --smoke) go to every refuel-train call. The same command resumes after a
# kill: finished methods and the finished evaluation are skipped, refuel-train resumes its finished
# iterations, collection shards and training checkpoints, refuel-evaluate reuses its cached dialogues.
#
# Sizing, gsm8k (README "Does it learn on an LLM?", Sizing). Budget of the full run, the issue's floor:
#   collection: REFUEL 2 × 256 + REBEL-LT 2 × 256 + DPO-LT 2 × 256 = 1536 pairs;
#   training:   6 iterations × (π_t log-probs on 256 pairs, validation on 64 before and after, 24 steps of 8 pairs);
#   evaluation: 5 policies (π_0 + 4) × 200 prompts = 1000 dialogues of H = 3.
# Cut from the main job's settings to approach 2 h: 64-token replies, 1 epoch, collection batches of 128 pairs,
# one vLLM engine for π_t and the simulated user (BACKEND=transformers for both on transformers). Measured
# (2026-11-30): REFUEL collection of 256 pairs ≈ 3 min alone on the cores; a training iteration ≈ 25 min alone
# (compute-bound fp32 steps of ≈ 33 s, with other jobs sharing the cores). Alone on the cores, on a fresh clone, the
# full run took 98 min (README "Results of record"): ≈ 12.5–15 min per iteration, steps of ≈ 12 s.
#
# Sizing, arithmetic (issue 26):
#   collection: REFUEL 2 seeds × 2 × 256 + REBEL-LT 2 × 256 + DPO-LT 2 × 256 = 2048 pairs (no user-model calls);
#   training:   8 iterations × 48 steps of 8 pairs (192 trained pairs × 2 epochs);
#   evaluation: 6 policies (π_0, REFUEL π_1 and π_2 of seed 0, π_2 of seed 1, REBEL-LT π_2, DPO-LT π_2) × 500
#               held-out dialogues = 3000 dialogues of H = 3.
# Measured (2026-12-07, fresh clone, Sapphire Rapids with AMX, 2 cores): 73 min end to end; alone on the cores an
# iteration takes 6–7 min (collection of 256 pairs 45–65 s, 48 fp32 steps of 3.6–4.4 s), the evaluation of 3
# policies × 500 dialogues 4.5–6 min. Do not run tests beside it: steps went to 22–27 s while they did.
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
task=${TASK:-gsm8k}
# runs: "<folder> <method> <seed>"; the first is REFUEL, evaluated at every iteration, the others at their last.
case $task in
  gsm8k)
    configs=configs/experiment
    reward=math_format
    default_out=runs/experiment
    runs=("refuel refuel 0" "rebel_lt rebel_lt 0" "dpo_lt dpo_lt 0")
    budget=() # refuel.evaluation.analysis's defaults project this task's full run
    ;;
  arithmetic)
    configs=configs/arithmetic
    reward=turn_answer
    default_out=runs/arithmetic
    runs=("refuel refuel 0" "refuel_seed1 refuel 1" "rebel_lt rebel_lt 0" "dpo_lt dpo_lt 0")
    budget=(--budget_pairs 2048 --budget_pair_epochs 3072 --budget_dialogues 3000) # the full run (Sizing)
    ;;
  *)
    echo "TASK must be gsm8k or arithmetic, got '$task'" >&2
    exit 2
    ;;
esac
if ((${#mode_flags[@]})); then
  out=${EXPERIMENT_DIR:-$default_out-smoke}
  iterations=1
  pairs=${SMOKE_PAIRS:-16}  # one collection batch of 2 × 16 conversations: the full run's per-call batch (32)
  prompts=${SMOKE_PROMPTS:-8}
  sizing=(--generation_batch_size "$pairs")
else
  out=${EXPERIMENT_DIR:-$default_out}
  iterations=2
  pairs=256
  prompts=$([[ $task == arithmetic ]] && echo 500 || echo 200)
  sizing=()
fi
judge_dir="$out/eval/reward-$reward"  # refuel-evaluate's folder for judge reward + the training reward
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

source scripts/stages.sh
take_lock "$out" experiment

echo "=== $(date -Is) $task experiment in $out: policy engine $backend, user engine $user_backend, $iterations iteration(s) of $pairs pairs, $prompts prompts"
last=$((iterations - 1))
engines=(--backend "$backend" --user_backend "$user_backend")
train=(--config "$configs/train.yaml" "${engines[@]}" --iterations "$iterations"
  --pairs_per_iteration "$pairs" "${sizing[@]}")
# held-out prompts: gsm8k the first $prompts of the held-out partition; arithmetic every held-out row of the
# generated file (eval.yaml: all_rows, split test), which holds $prompts of them.
if [[ $task == arithmetic ]]; then
  prompt_file="$out/prompts.jsonl"
  if [[ ! -f $prompt_file ]]; then
    stage generate-prompts python -m dialogsim.arithmetic --output "$prompt_file" --heldout_dialogues "$prompts"
  fi
  train+=(--prompts "$prompt_file")
  held_out=(--prompts "$prompt_file")
else
  held_out=(--n_prompts "$prompts")
fi
# evaluate CANDIDATE...: every candidate against π_0 on the held-out prompts. Each policy's dialogues are cached
# in $out/eval/dialogues, so a later call with more candidates generates only the new ones.
evaluate() {
  refuel-evaluate --config "$configs/eval.yaml" "${engines[@]}" "${held_out[@]}" --output_dir "$out/eval" \
    --candidates "$@"
}
folders=()
candidates=()
for run in "${runs[@]}"; do
  read -r folder _ <<<"$run"
  folders+=("$folder")
  if ((${#candidates[@]} == 0)); then # the first run (REFUEL, seed 0): every iteration
    for ((t = 0; t < iterations; t++)); do
      candidates+=("$out/$folder/iteration_$t/policy")
    done
  else
    candidates+=("$out/$folder/iteration_$last/policy")
  fi
done
evaluated="$out/eval/.all-methods" # written when the evaluation of every method has ended
for run in "${runs[@]}"; do
  read -r folder method seed <<<"$run"
  if [[ -f $out/$folder/iteration_$last/policy/config.json ]]; then
    echo "=== $folder: all $iterations iteration(s) trained, skipped"
  else
    stage "train-$folder" refuel-train "${train[@]}" --method "$method" --seed "$seed" --output_dir "$out/$folder" "$@"
  fi
  # The first REFUEL run's policies are evaluated as soon as they exist: its table can be read while the others train.
  if [[ $folder == "${folders[0]}" && ! -f $evaluated ]]; then
    stage evaluate-refuel evaluate "${candidates[@]:0:iterations}"
    python -m refuel.evaluation.analysis --run_dir "$out" --eval_dir "$judge_dir" --methods "$folder" "${budget[@]}"
  fi
done

if [[ -f $evaluated ]]; then
  echo "=== evaluation of every method done ($judge_dir/report.html), skipped"
else
  stage evaluate evaluate "${candidates[@]}"
  touch "$evaluated"
fi

# REFUEL − REBEL-LT per turn, paired by prompt; the labels are refuel-evaluate's (refuel/evaluation/policy_names.py):
# two REFUEL runs' last policies share "REFUEL π_T", so seed 0's carries its folder.
refuel_label="REFUEL π_$iterations"
if [[ $task == arithmetic ]]; then
  refuel_label+=" (refuel/iteration_$last)"
fi
python -m refuel.evaluation.analysis --run_dir "$out" --eval_dir "$judge_dir" --methods "${folders[@]}" "${budget[@]}" \
  --contrast "$refuel_label" "REBEL-LT π_$iterations"
echo "=== $(date -Is) experiment done: $out/summary.md"
