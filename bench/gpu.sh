#!/usr/bin/env bash
# The device check for a lent GPU (one run, ~8 minutes on an H100): copy its output into
# bench/RESULTS.md with the card named.  Usage: bash bench/gpu.sh [OUT_DIR]
#   1. one α+φ+θ iteration at 64² ... 1024² with the default widths, bf16 and fp32 (images/s,
#      fraction of the matmul peak of that precision, peak memory per resolution) and the hours
#      of the whole 4 -> 1024 schedule from those rates;
#   2. a multi-stage smoke run of the real training loop (4 -> 64, bf16), its bench/loop.py table.
# On the device machine lmdb and clean-fid are missing: carry their wheels (see the device
# tool's README) and install them before running this.
set -euo pipefail
out=${1:-${OUT:-/tmp}}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
for precision in bf16 fp32; do
  python bench/step.py --device cuda --min-res 4 --max-res 1024 --precision "$precision" \
    --seconds 2 --no-strict --schedule 2>&1 | tee "$out/step-$precision.txt"
done
python bench/loop.py --max-res 64 --fade-kimg 2 --stable-kimg 2 --mixed-precision bf16 --latent-dim 512 \
  --channel-base 16384 --channel-max 512 2>&1 | tail -n 12 | tee "$out/loop-bf16.txt"
