#!/usr/bin/env bash
# The device check for a lent GPU (one call of ~9 minutes on an H100): copy its output into
# bench/RESULTS.md with the card named.  Usage: bash bench/gpu.sh [OUT_DIR]
#   1. one α+φ+θ iteration at 4² ... 1024² with the default widths, bf16, at the schedule's
#      per-GPU batch in its micro-batches (cuDNN benchmark mode, training's default), and the
#      hours of the whole 4 -> 1024 schedule;
#   2. R1's cost in the energy's top block, torch's double backward of F.conv2d against
#      networks/layers.py's conv2d (the CUDA path), 64² ... 1024² (bench/conv_grad.py);
#   3. the top operators by GPU time at 256² ... 1024², by operator and by input shape;
#   4. the real training loop, 4 -> 128, bf16, default widths, bench/loop.py's table;
#   5. the generator and inference networks compiled (torch.compile), 256² ... 1024²;
#   6. fp32 at 64² ... 1024²;
#   7. train.py --dry-run at 1024² on the GPU: each phase's measured memory.
# Parts run in that order, each with its own log under OUT_DIR and a time limit: at most
# GPU_PART_SECONDS (240), and never past GPU_TOTAL_SECONDS (540) since the start; the summary
# of every part is printed last. On the device machine lmdb and clean-fid are missing: carry
# their wheels (see the device tool's README) and install them before running this.
set -uo pipefail
out=${1:-${OUT:-/tmp}}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
part() {  # part NAME COMMAND...: run with a time limit, log to OUT/NAME.txt
  local name=$1; shift
  local left=$(( ${GPU_TOTAL_SECONDS:-540} - SECONDS - 15 ))
  local limit=$(( left < ${GPU_PART_SECONDS:-240} ? left : ${GPU_PART_SECONDS:-240} ))
  if (( limit < 20 )); then echo "== $name: skipped (no time left)"; return; fi
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "== $name: exit $?, $((SECONDS - start)) s"
}
step=(python bench/step.py --device cuda --seconds 1 --no-strict)
part step-bf16 "${step[@]}" --precision bf16 --min-res 4 --max-res 1024 --schedule
part conv-grad-bf16 python bench/conv_grad.py --device cuda --precision bf16 --min-res 64 \
     --max-res 1024 --seconds 1
part profile-bf16 "${step[@]}" --precision bf16 --min-res 256 --max-res 1024 --seconds 0.5 --profile
python -c "from triangle.datasets import write_demo_lmdb; write_demo_lmdb('/tmp/demo128.lmdb', count=1000, max_resolution=128)" \
  && part loop-bf16 python bench/loop.py --data /tmp/demo128.lmdb --max-res 128 --fade-kimg 2 \
       --stable-kimg 2 --mixed-precision bf16 --num-workers 4 --seconds 1
part step-bf16-compiled "${step[@]}" --precision bf16 --min-res 256 --max-res 1024 --compile
part step-fp32 "${step[@]}" --precision fp32 --min-res 64 --max-res 1024
python -c "from triangle.datasets import write_demo_lmdb; write_demo_lmdb('/tmp/demo1024.lmdb', count=64, max_resolution=1024)" \
  && part dry-run-1024 python progressive/train.py --data /tmp/demo1024.lmdb --max-res 1024 \
       --mixed-precision bf16 --dry-run
echo; echo "==== summary"
for f in step-bf16 step-bf16-compiled step-fp32; do
  [[ -f "$out/$f.txt" ]] && { echo "-- $f"; grep -E "^ +[0-9]+ |^total|^device|^peak" "$out/$f.txt"; }
done
[[ -f "$out/conv-grad-bf16.txt" ]] && { echo "-- conv-grad-bf16"; tail -n +2 "$out/conv-grad-bf16.txt"; }
[[ -f "$out/dry-run-1024.txt" ]] && { echo "-- dry-run-1024"; grep -E "^ +[0-9]+ +(fade|stable)|GPU memory|Error" "$out/dry-run-1024.txt"; }
[[ -f "$out/loop-bf16.txt" ]] && { echo "-- loop-bf16"; grep -E "^kimg|img/s" "$out/loop-bf16.txt" | tail -n 20; }
true
