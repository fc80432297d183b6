#!/usr/bin/env bash
# Everything a GPU session should measure, in one go (device time is scarce): the CUDA test cases,
# then the benchmarks, each report as JSON in OUT_DIR (default $OUT, else ./gpu-out). Record the
# figures, with the device named, in docs/benchmarks.md.
#   bash scripts/gpu_session.sh kernels    # the CUDA tests + the MoE kernel (< 10 min)
#   bash scripts/gpu_session.sh proofs     # the CPU proofs (AOT compiles, step model) beside the measurements (< 6 min)
#   bash scripts/gpu_session.sh speed      # full 26B-A4B shape, int4 experts, graphs on and off (< 8 min)
#   bash scripts/gpu_session.sh reference  # bf16 against transformers, same shapes (< 5 min)
# One stage per device call: a call may run 10 minutes at most.
set -u
stage=${1:-kernels}
out=${OUT_DIR:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
log="$out/log.txt"  # at most 8 files come back from a device run: one log, one JSON per benchmark
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$log" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >> "$log" 2>&1

if [[ $stage == proofs ]]; then
# 0. What CI proves without a GPU, rerun here so its figures sit beside the measured ones.
timeout 240 python -m kernels.aot --jobs 16 > "$out/aot.jsonl" 2>> "$log"
timeout 90 python scripts/step_model.py --json --out "$out/step_model.json" 2>> "$log"
fi
if [[ $stage == kernels ]]; then
# 1. Kernels, CUDA graphs and the engine against their references, on the GPU, at the real shapes
#    (the CUDA-only cases that CPU runs skip, plus every fast-path test under the device's own layouts).
timeout 300 python -m pytest -q -rs tests/test_kernels.py tests/test_kernels_int8.py tests/test_kernels_lm_head.py \
    tests/test_kernels_norm.py tests/test_kernels_mix.py tests/test_graphs.py tests/test_cache.py \
    tests/test_engine.py 2>&1 | tail -40 > "$out/tests.txt"
# The CUDA-only cases of today's fast paths (fused draw and its Philox stream, the draw on the head's
# raw logits, GeGLU, o_proj over the heads, the soft embedding's finish, the draw feeding real
# graphs): never run on a GPU yet.
timeout 150 python -m pytest -q -rs -k "test_cuda or test_gpu" tests/test_kernels_sample.py tests/test_kernels_cuda_rng.py \
    tests/test_kernels_geglu.py tests/test_kernels_int8_heads.py tests/test_kernels_qkv.py tests/test_graphs_fused_draw.py \
    tests/test_kernel_fallback.py tests/test_kernels_int8_soft.py 2>&1 | tail -30 \
    >> "$out/tests.txt"

# 2. The MoE kernel alone: GB/s against the device.
timeout 120 python scripts/bench.py --config full --moe-only --out "$out/moe.json" 2>> "$log"
fi
if [[ $stage == speed ]]; then
# 3. The full 26B-A4B shape with int4 experts: with CUDA graphs (the default) and without.
timeout 240 python scripts/bench.py --config full --experts int4 --prompt-len 8192 --steps 16 \
    --out "$out/int4_graphs.json" 2>> "$log"
timeout 240 python scripts/bench.py --config full --experts int4 --prompt-len 8192 --steps 16 --no-cuda-graphs \
    --out "$out/int4_eager.json" 2>> "$log"
fi
if [[ $stage == reference ]]; then
# 4. bf16 experts against transformers on the same shapes (51 GB of weights: H100 80 GB).
timeout 300 python scripts/bench.py --config full --reference --prompt-len 2048 --steps 8 \
    --out "$out/bf16_reference.json" 2>> "$log"
fi
ls -la "$out"
