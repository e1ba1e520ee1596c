#!/usr/bin/env bash
# The one GPU check a session with a lent H100/H200 runs (about 8 minutes): the kernel tests compiled on the GPU,
# then bench/kernels_gpu.py at batch 1, 4, 16 and 1024 on MiniCPM4-8B shapes for the formats the issues target.
# Results go to $OUT (the device tool brings them back): tests.txt, kernels_gpu.md, tune.json.
#     bash scripts/gpu_check.sh            (from the repository root, with torch, triton and the test extra installed)
set -uo pipefail
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_linear.py \
    tests/test_ternary.py tests/test_reference_models.py -k "kernel or stream or split or trits or joined or graph" \
    > "$OUT/tests.txt" 2>&1
echo "tests exit $?" >> "$OUT/tests.txt"
timeout 300 python bench/kernels_gpu.py --tune-cache "$OUT/tune.json" --models minicpm4-8b --batches 1,4,16,1024 \
    --formats Q4_K,Q8_0,Q6_K,mlx4g64,TQ2_0,TQ1_0 > "$OUT/kernels_gpu.md" 2>&1
echo "bench exit $?" >> "$OUT/kernels_gpu.md"
tail -5 "$OUT/tests.txt" "$OUT/kernels_gpu.md"
