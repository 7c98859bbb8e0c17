#!/usr/bin/env bash
# Simulate a 2-node run on this host (CPU only, one process per "node"): two background
# `accelerate launch --num_machines 2 --machine_rank {0,1} --main_process_ip 127.0.0.1`
# that must join ONE world of 2 processes. Checks what a real multi-node launch can get
# silently wrong: both launchers exit 0, summary.json says world_size 2, and the last
# checkpoint holds a loader position for each rank (loader_rank0.json, loader_rank1.json).
#
#   bash launch/simulate_two_nodes.sh                 # DDP (gloo)
#   bash launch/simulate_two_nodes.sh zero2           # DeepSpeed ZeRO-2 (also zero1, zero3)
#   bash launch/simulate_two_nodes.sh ddp -- --set train.max_steps=50   # extra `train vae` args
#
# Environment: RUN_ROOT (default runs/simulate_two_nodes; the built-in data set is generated
# there once, ~15 s), PORT (default 29600; must be free), TIMEOUT (seconds, default 600),
# ACCELERATE (default .venv/bin/accelerate if present, else `accelerate` on PATH).
# Logs: $RUN_ROOT/<mode>/node0.log, node1.log. Exit status 0 only if everything checked out.
#
# DDP uses launch/accelerate/ddp_multinode.yaml with ACCELERATE_USE_CPU=true (without it the
# two processes would not form a CPU world). DeepSpeed uses launch/accelerate/zeroN.yaml with
# --deepspeed_multinode_launcher standard (the default, pdsh, makes rank 0 look for a hostfile
# and train alone), WITHOUT ACCELERATE_USE_CPU (it would silently turn DeepSpeed into DDP) and
# with CUDA hidden, so the trainer builds its gloo group itself.
set -uo pipefail

mode="${1:-ddp}"
[ $# -gt 0 ] && shift
if [ "${1:-}" = "--" ]; then shift; fi
extra=("$@")

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
accelerate_bin="${ACCELERATE:-}"
if [ -z "$accelerate_bin" ]; then
  if [ -x "$root/.venv/bin/accelerate" ]; then accelerate_bin="$root/.venv/bin/accelerate"; else accelerate_bin=accelerate; fi
fi
run_root="${RUN_ROOT:-runs/simulate_two_nodes}"
port="${PORT:-29600}"
timeout_s="${TIMEOUT:-600}"
run_dir="$run_root/$mode"

case "$mode" in
  ddp)
    launcher=(--config_file launch/accelerate/ddp_multinode.yaml --multi_gpu)
    node_env=(ACCELERATE_USE_CPU=true)
    ;;
  zero1 | zero2 | zero3)
    launcher=(--config_file "launch/accelerate/$mode.yaml" --deepspeed_multinode_launcher standard)
    node_env=(-u ACCELERATE_USE_CPU CUDA_VISIBLE_DEVICES=)
    ;;
  *)
    echo "usage: $0 [ddp|zero1|zero2|zero3] [-- extra 'latentcell train vae' args]" >&2
    exit 2
    ;;
esac

rm -rf "$run_dir"
mkdir -p "$run_dir"
train_args=(
  --set "run.root=$run_root" --set "run.dir=$run_dir"
  --set model.n_hidden=32 --set data.batch_size=64 --set train.max_steps=20
  --set train.checkpoint_every=10 --set train.progress=false
  "${extra[@]}"
)

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
}
trap 'cleanup; exit 130' INT TERM

start=$(date +%s)
for rank in 0 1; do
  # setsid: each "node" gets its own process group, so cleanup can stop all of its processes.
  env "${node_env[@]}" setsid -w "$accelerate_bin" launch "${launcher[@]}" \
    --num_machines 2 --num_processes 2 --machine_rank "$rank" \
    --main_process_ip 127.0.0.1 --main_process_port "$port" \
    -m latentcell.launch train vae "${train_args[@]}" > "$run_dir/node$rank.log" 2>&1 &
  pids+=($!)
done
echo "[simulate] $mode: node0 pid ${pids[0]}, node1 pid ${pids[1]}, port $port, logs in $run_dir/node{0,1}.log"

# Wait for both, but never forever: a node that died before the rendezvous leaves the other
# one waiting for its peer.
rcs=()
for i in 0 1; do
  while kill -0 "${pids[$i]}" 2>/dev/null; do
    if [ $(($(date +%s) - start)) -ge "$timeout_s" ]; then
      echo "[simulate] timeout after ${timeout_s}s: stopping both nodes" >&2
      cleanup
      sleep 2
      break
    fi
    sleep 1
  done
  wait "${pids[$i]}"
  rcs+=($?)
done
trap - INT TERM
wall=$(($(date +%s) - start))

status=0
for rank in 0 1; do
  if [ "${rcs[$rank]}" -ne 0 ]; then
    echo "[simulate] node$rank FAILED (exit ${rcs[$rank]}); last lines of $run_dir/node$rank.log:" >&2
    tail -n 15 "$run_dir/node$rank.log" >&2
    status=1
  fi
done

summary="$run_dir/summary.json"
if [ -f "$summary" ]; then
  read -r world step < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["world_size"], d["step"])' "$summary")
  echo "[simulate] $mode: world_size=$world step=$step wall=${wall}s"
  if [ "$world" != 2 ]; then
    echo "[simulate] expected ONE world of 2 processes, got world_size=$world" >&2
    status=1
  fi
  ckpt="$run_dir/checkpoints/step_$step"
  for rank in 0 1; do
    if [ ! -f "$ckpt/loader_rank$rank.json" ]; then
      echo "[simulate] missing $ckpt/loader_rank$rank.json" >&2
      status=1
    fi
  done
else
  echo "[simulate] no $summary: the run did not finish" >&2
  status=1
fi
[ "$status" -eq 0 ] && echo "[simulate] $mode OK"
exit "$status"
