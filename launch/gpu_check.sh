#!/usr/bin/env bash
# The prepared GPU check (README, "GPU"): the VAE, the DiT and the ST trained for a few hundred
# steps each in bf16, printed as cells/s and model FLOPs utilization; under 5 minutes on one
# H100/H200. Without a GPU it runs the CPU fallback (20 steps) so the script does not rot.
#
#   bash launch/gpu_check.sh [OUT]          # default OUT: runs/gpu_check
#   STEPS=100 TINY=1 STORE=cells.zarr bash launch/gpu_check.sh /tmp/check
set -euo pipefail
out="${1:-runs/gpu_check}"
python_bin="${PYTHON:-python}"
args=(--out "$out")
[ -n "${STEPS:-}" ] && args+=(--steps "$STEPS")
[ -n "${TINY:-}" ] && args+=(--tiny)
[ -n "${STORE:-}" ] && args+=(--store "$STORE")
"$python_bin" -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec "$python_bin" -m latentcell.launch benchmark gpu-check "${args[@]}"
