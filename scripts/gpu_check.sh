#!/usr/bin/env bash
# Everything that needs a GPU, as one command for one lent machine (one H200: about 8 minutes,
# bounded at 10 by the timeouts below). In order:
#   1. the GPU tests: fp8 numerics against bf16 on CUDA kernels; the fused loss under bf16 autocast
#      and its compiled static path; regional torch.compile (inductor) = eager with activation
#      checkpointing;
#   2. FSDP2 and FSDP1 (configs/strategy/fsdp2.yaml, fsdp.yaml) on the shapes recipe with validation
#      and sharded checkpoints (FSDP2 with model.compile true): a run, a SIGKILLed run resumed with --ckpt_path last (losses
#      compared), vlm export of the sharded directory (scripts/gpu_multirank.py: 2 ranks with 2 GPUs;
#      with one GPU one rank, as NCCL refuses two ranks on one device);
#   3. scripts/gpu_bench.py: MFU, tokens/s and peak memory of a Llama-3.2-1B + ViT-L/14 LLaVA-style
#      model at seq 2048 (bf16 eager, bf16 compiled, fp8 tensorwise/rowwise/delayed compiled), the
#      same text model without images, and transformers' Llama of that size (eager, compiled);
#      writes benchmarks/results/gpu.json and benchmarks/results/gpu.md (the table for
#      benchmarks/README.md).
# Every step runs even when an earlier one fails; the script exits 1 if any failed.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (needs the project's dependencies and a CUDA torch)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-outputs/gpu_check}}
mkdir -p "$out" benchmarks/results
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
failed=()

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $out/NAME.txt, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*"
    local start=$SECONDS
    if timeout "$limit" "$@" > >(tee "$out/$name.txt") 2>&1; then
        echo "== $name passed in $((SECONDS - start))s"
    else
        echo "== $name FAILED (exit $?) after $((SECONDS - start))s"
        failed+=("$name")
    fi
}

"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

export VLM_TEST_DEVICE=cuda VLM_TEST_INDUCTOR=1
step fp8_numerics 60 "$python" -m pytest -q tests/training/test_fp8.py -k sqnr
step gpu_tests 110 "$python" -m pytest -q tests/text/test_loss_static.py tests/test_compile.py
step multirank 180 "$python" scripts/gpu_multirank.py --out "$out/multirank" --steps 20 --every 10 --timeout 90 --compile
step gpu_bench 240 "$python" scripts/gpu_bench.py --steps 8 --warmup 3 \
    --json benchmarks/results/gpu.json --markdown benchmarks/results/gpu.md

if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]} (logs in $out)"
    exit 1
fi
echo "gpu_check: all passed (logs in $out; table in benchmarks/results/gpu.md)"
