#!/usr/bin/env bash
# The GPU study in named steps, for a node with torch + CUDA and no internet (bench/gpu/recipe.py
# plans and runs them; `recipe.sh --help` lists them):
#
#   bash bench/gpu/recipe.sh first --budget 540      # the first pass, most valuable steps first
#   bash bench/gpu/recipe.sh next --budget 540       # on from the first step not yet done
#   bash bench/gpu/recipe.sh STEP [--out DIR]        # one step
#   bash bench/gpu/recipe.sh --rehearse all          # every step on CPU with tiny shapes
#
# Offline installs: where hydra, wandb, ... are missing, the wheels in $WHEELS (default .whl, made
# on a machine with internet by bench/gpu/wheelhouse.sh from bench/gpu/wheels.txt) are installed
# with pip --no-index --no-deps into a private folder ($SITE, made anew) put on PYTHONPATH; torch
# is never touched.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
if ! python3 -c "import hydra, omegaconf, wandb, pytest" 2>/dev/null; then
  wheels=${WHEELS:-.whl}
  compgen -G "$wheels/*.whl" >/dev/null ||
    { echo "recipe: hydra/wandb/pytest missing and no wheels in $wheels (bash bench/gpu/wheelhouse.sh $wheels)" >&2; exit 2; }
  site=${SITE:-/tmp/efficient-attention-site}  # the recipe's own folder: made anew each time
  # into a fresh folder: pip --target over an old one leaves namespace packages (google.*) half there
  rm -rf "$site.new"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site.new" "$wheels"/*.whl
  rm -rf "$site" && mv "$site.new" "$site"
  export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import hydra, omegaconf, wandb, pytest" ||
    { echo "recipe: the wheels in $wheels installed, but the suite's imports fail (above)" >&2; exit 2; }
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
exec python3 -m bench.gpu.recipe "$@"
