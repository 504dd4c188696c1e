#!/usr/bin/env bash
# The GPU check: one prepared run (<= 10 minutes, no network) of every CUDA path the CPU CI cannot run.
#   OUT=/some/folder bash scripts/gpu_check.sh      # results: $OUT/gpu_check.{json,md}, $OUT/gpu_tests.log
# Needs a CUDA torch, transformers, onnx, onnxruntime, onnxscript, typer, safetensors, pillow, psutil already
# installed (the device image has them). Missing wheels (platformdirs, filelock, bitsandbytes, ...) are taken
# from ./.whl when that folder exists (pip --no-index: nothing is downloaded). The repo is used in place.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.csv"
# 1. the tests marked gpu (skipped on CPU machines), under a 2.5-minute cap
timeout 150 python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
# 2. adapt per precision, 4-bit LLM, planner vs measured under Jetson budgets, ORT CUDA parity, CLIP-L/14-336
timeout 360 python3 scripts/gpu_check.py --out "$OUT"
# 3. issue 14's step goal on CUDA: a LoRSU step vs a LoRA step on ViT-B/16 (the sampled fc1 gradient forced too:
#    no CUDA crossover is measured, so the layer forms the dense gradient there by default)
timeout 90 python3 benchmarks/bench_cost.py --device cuda --models vitb16 --methods lorsu lora lorsu-sampled \
  --steps 5 --warmup 2 --results-dir "$OUT" 2>&1 | tail -8 | tee "$OUT/bench_cost_cuda.txt"
