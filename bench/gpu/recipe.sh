#!/usr/bin/env bash
# The GPU study in named steps, for a node with torch + CUDA and no internet.
#
#   bash bench/gpu/recipe.sh STEP [OUT]
#
# STEP: tests | main | scaling | harness | maxlen | xl_eval | linformer | decode | lra | all
# OUT:  where everything is written (default results/gpu_<gpu name>); each step's sweep goes to
#       OUT/<step>, and OUT/<step>.tar.gz packs its result.json, report.md and results.csv files.
#
# Offline installs: where hydra, wandb, ... are missing, the wheels in $WHEELS (default .whl,
# made on a machine with internet by shared/tools/wheelhouse.sh) are installed with
# pip --no-index --no-deps into a private folder put on PYTHONPATH; torch is never touched.
# Every sweep runs with resume=true, so a step cut short by a time limit is finished by
# running the same step again (accuracy jobs also continue from their checkpoints).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
step=${1:?usage: recipe.sh STEP [OUT]  (STEP: tests main scaling harness maxlen xl_eval linformer decode lra all)}
cd "$repo"

if ! python3 -c "import hydra, wandb" 2>/dev/null; then
  wheels=${WHEELS:-.whl}
  [ -d "$wheels" ] || { echo "recipe: hydra/wandb missing and no wheel folder $wheels (see shared/tools/wheelhouse.sh)" >&2; exit 2; }
  site=${SITE:-/tmp/efficient-attention-site}
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'none')")
[ "$gpu" != none ] || { echo "recipe: no CUDA device here" >&2; exit 2; }
out=$(realpath -m "${2:-results/gpu_$gpu}")
mkdir -p "$out"
sweep() { python3 run.py -m hydra.sweep.dir="$out/$1" resume=true "${@:2}"; }
exact="full,sdpa,xformers,chunked,flex"
gpu_cell=(device=cuda dtype=bfloat16 model=gpu_d128)

run_step() {
  case $1 in
    tests) python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/tests.log" ;;
    main) mkdir -p "$out/main/work" && (cd "$out/main/work" && python3 "$repo/run.py") 2>&1 | tee "$out/main/log.txt" ;;
    scaling)
      sweep scaling experiment=scaling_gpu
      sweep scaling experiment=scaling_gpu causal=true
      sweep scaling experiment=scaling_gpu attention=sdpa attention.kernel=flash,efficient,cudnn causal=false,true
      sweep scaling experiment=scaling_gpu attention=xformers attention.op=cutlass,flash,flash3 causal=false,true ;;
    harness) python3 -m bench.gpu.harness_check --out "$out/harness" ;;
    maxlen) sweep maxlen bench=maxlen attention=$exact,linformer,xl "${gpu_cell[@]}" ;;
    xl_eval) sweep xl_eval bench=xl_eval attention=xl causal=true seq_len=800,3800 device=cuda ;;
    linformer)
      sweep linformer attention=linformer attention.k=128,256 "${gpu_cell[@]}" seq_len=4096,8192,16384,32768,65536
      sweep linformer attention=full,sdpa "${gpu_cell[@]}" seq_len=4096,8192,16384,32768,65536 ;;
    decode)
      sweep decode experiment=decode_gpu
      sweep decode experiment=decode_gpu attention=sdpa attention.kernel=flash,efficient,cudnn
      sweep decode experiment=decode_gpu attention=xformers attention.op=decoder,splitk ;;
    lra) sweep lra bench=accuracy experiment=lra_listops attention=full,linformer bench.resume=true ;;
    *) echo "recipe: unknown step $1 (tests main scaling harness maxlen xl_eval linformer decode lra all)" >&2; exit 2 ;;
  esac
  if [ -d "$out/$1" ]; then
    python3 -m bench.report "$out/$1" --markdown "$out/$1/report.md" --csv "$out/$1/results.csv" >/dev/null || true
    (cd "$out" && find "$1" \( -name result.json -o -name report.md -o -name results.csv -o -name 'log*.txt' \) -print0 |
      tar -czf "$1.tar.gz" --null -T -)
  fi
}

if [ "$step" = all ]; then
  for s in tests main scaling harness maxlen xl_eval linformer decode lra; do run_step "$s"; done
else
  run_step "$step"
fi
