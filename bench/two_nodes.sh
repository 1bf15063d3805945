#!/usr/bin/env bash
# Two "nodes" on one machine: the multi-node launch, rehearsed over loopback before a cluster.
#   bash bench/two_nodes.sh [RUN_DIR]          # ~1 minute on a 2-core CPU
# Each `accelerate launch` below is what one node of a two-node job runs (on a cluster: the
# head node's address for --main_process_ip, and --machine_rank 0 / 1 on the two hosts). Here
# both run on this machine, one CPU process each (gloo), and meet on 127.0.0.1 exactly as two
# hosts would. The run is the tests' tiny 4 -> 16 one; rerun the script to resume it.
set -euo pipefail
run=${1:-runs/two-nodes}
data=${DATA:-data/demo16.lmdb}
port=${PORT:-29611}
[[ -e $data ]] || python tools/prepare_lmdb.py demo --out "$data" --count 256 --max-res 16 --holdout 16
export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1
train=(progressive/train.py --data "$data" --run-dir "$run" --max-res 16 --latent-dim 8 --channel-base 64
       --channel-max 16 --batch 16 --fade-kimg 0.064 --stable-kimg 0.064 --tick-kimg 0.032
       --checkpoint-kimg 0.048 --num-workers 0 --grid-samples 16)
node() {  # node RANK: one node's launcher, one process on it
  accelerate launch --multi_gpu --num_machines 2 --num_processes 2 --machine_rank "$1" \
    --main_process_ip 127.0.0.1 --main_process_port "$port" --mixed_precision no --dynamo_backend no \
    "${train[@]}"
}
node 1 > "${run%/}-node1.log" 2>&1 &   # the second host: it writes nothing of the run
node 0                                 # the head node: progress lines, checkpoints, grids
wait
echo "node 1's output: ${run%/}-node1.log; the run: $run"
