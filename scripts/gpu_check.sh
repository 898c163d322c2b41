#!/usr/bin/env bash
# The GPU check: areal's CUDA paths (engine parity, Triton kernels, weight transport, the default
# recipe, engine throughput) in at most ~8 minutes on one GPU. No network, nothing downloaded.
#
#   bash scripts/gpu_check.sh                 # every check; the last stdout line is one JSON object
#   bash scripts/gpu_check.sh --checks kernels,engine_parity
#
# Exit status: 0 every check passed (or was skipped for a stated reason), 1 a check failed,
# 2 bad arguments, 3 no CUDA device (nothing ran; the JSON line says so).
# PYTHON=/path/to/python picks the interpreter (default: python3, else python); it must have torch.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if command -v python3 >/dev/null 2>&1; then py=python3; else py=python; fi
fi
# offline and quiet: nothing may be fetched, and wandb must not start a run
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false
exec "$py" "$here/gpu_check.py" "$@"
