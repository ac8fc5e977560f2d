#!/usr/bin/env bash
# One device run for the LMM-stage numbers in benchmarks/RESULTS.md: lmm_forward per capture mode for the real
# Qwen2.5-VL-3B and -7B shapes (random weights, bf16). Wheels the GPU image lacks travel in .whl/ (see the device
# notes); results land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/device.txt"
python3 benchmarks/lmm_forward.py --arch tiny --seq-len 256 --device cuda 2>&1 | tee "$OUT/lmm_tiny.txt"
for arch in qwen2_5_vl_3b qwen2_5_vl_7b; do
  python3 benchmarks/lmm_forward.py --arch $arch --seq-len 1536 --device cuda --dtype bfloat16 --repeats 3 2>&1 \
    | tee "$OUT/lmm_${arch}.txt"
done
