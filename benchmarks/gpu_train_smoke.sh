#!/usr/bin/env bash
# A short CUDA check of the training path as users launch it: torchrun (NCCL process group, DDP wrapper) with one
# process, bf16 autocast, the random-LMM demo config for 40 steps with validation and checkpoints, then resume and
# eval.
# Wheels the GPU image lacks travel in .whl/ (see the device notes); logs land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
common="train.out_dir=/tmp/smoke train.progress=false train.log_every=10 train.val_every=20 train.save_every=20
  data.val.0.length=16 train.attention_only_baseline=false"
torchrun --standalone --nproc_per_node 1 run.py train --config configs/demo_random_lmm.yaml $common \
  train.max_steps=40 train.stop_after_steps=20 2>&1 | tee "$OUT/train_part1.txt"
torchrun --standalone --nproc_per_node 1 run.py train --config configs/demo_random_lmm.yaml $common \
  train.max_steps=40 --resume 2>&1 | tee "$OUT/train_resumed.txt"
python3 run.py eval --config configs/demo_random_lmm.yaml --checkpoint /tmp/smoke eval.progress=false \
  data.test.0.length=16 2>&1 | tee "$OUT/eval.txt"
cp /tmp/smoke/metrics.jsonl "$OUT/" 2>/dev/null
