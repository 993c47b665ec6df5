#!/usr/bin/env bash
# Installs the suite and its dependencies into the current Python environment.
#   torch:    kept if already installed (a GPU machine keeps its CUDA build); otherwise the CPU
#             build is installed, never the multi-GB CUDA wheels. TORCH_SPEC overrides the spec.
#   xformers: installed with --no-deps on CUDA machines (WITH_XFORMERS=1 forces it, 0 skips it),
#             so that it can never replace the installed torch.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  spec=${TORCH_SPEC:-torch==2.13.0+cpu}
  echo "setup: torch not found; installing the CPU build ($spec)"
  pip_install "$spec" 2>/dev/null ||
    pip_install --index-url https://download.pytorch.org/whl/cpu "${spec%+cpu}"
fi

pip_install -e ".[dev,hf]"

has_cuda=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "${WITH_XFORMERS:-$has_cuda}" = "1" ]; then
  pip_install --no-deps "xformers>=0.0.28" || echo "setup: xformers not installed (its backend will be 'unsupported')"
fi
"$PYTHON" -c "import torch; print(f'setup: done (torch {torch.__version__}, cuda available: {torch.cuda.is_available()})')"
