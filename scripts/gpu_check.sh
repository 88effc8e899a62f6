#!/usr/bin/env bash
# The GPU paths CPU CI cannot run (scripts/gpu_check.py says what each step checks): the REFUEL loss and
# trainer on CUDA in bf16 with a random-initialised tiny Llama, pair collection on the transformers
# backend (no vLLM), one FSDP2 launch through configs/accelerate/fsdp.yaml and, when deepspeed can be
# installed offline, one launch per DeepSpeed config. Needs one NVIDIA GPU and an image with torch,
# accelerate, transformers and peft; no internet. About 2-4 minutes; every step has a time limit,
# the whole check 8 minutes.
#
# Usage (from anywhere):  bash scripts/gpu_check.sh [--tokenizer DIR] [--steps loss,trainer,...]
#   --tokenizer DIR       a tokenizer folder (default: SmolLM2's, resolved by dialogsim.models)
#   DEEPSPEED_WHEELS=DIR  a folder of wheels (deepspeed built with DS_BUILD_OPS=0 and its
#                         dependencies: pip wheel deepspeed==0.19.8 -w DIR); installed offline into a
#                         venv for the DeepSpeed steps, which are skipped otherwise.
# Exit status: 0 every step passed or was skipped, 1 a step failed, 2 no CUDA device (nothing ran).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=python
if [[ -n "${DEEPSPEED_WHEELS:-}" ]]; then
    venv=$(mktemp -d -t gpu_check_venv.XXXX)
    python -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install --quiet --no-index --find-links "$DEEPSPEED_WHEELS" deepspeed
    python="$venv/bin/python"
fi
exec timeout 480 "$python" scripts/gpu_check.py check "$@"
