#!/usr/bin/env bash
# The GPU-only checks, as one script for one H200 (about 9 minutes):
#   1. bf16 vs fp8 (tensorwise, rowwise, delayed) training throughput and MFU of a ~1B Llama +
#      ViT-L LLaVA model at seq 2048 (random weights; nothing is downloaded);
#   2. the fp8 numerics tests on CUDA (against bf16);
#   3. FSDP2 and FSDP1 (configs/strategy/fsdp2.yaml, fsdp.yaml) on the shapes recipe with validation
#      and sharded checkpoints: a run, a run killed with SIGKILL and resumed with --ckpt_path last
#      (losses compared), and vlm export of the sharded directory (scripts/gpu_multirank.py; 2 ranks
#      with 2 GPUs, else 1).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (needs the project's dependencies and a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-outputs/gpu_check}}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
timeout 420 "$python" scripts/gpu_bench.py --json "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.txt"
VLM_TEST_DEVICE=cuda timeout 120 "$python" -m pytest -q tests/training/test_fp8.py -k "sqnr" 2>&1 | tee "$out/fp8_numerics.txt"
timeout 300 "$python" scripts/gpu_multirank.py --out "$out/multirank" 2>&1 | tee "$out/multirank.txt"
