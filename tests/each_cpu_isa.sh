#!/usr/bin/env bash
# The backend tests once per CPU vector ISA that inductor and ATen can generate code for, on
# any x86-64: compiled kernels (FlexAttention's) differ by ISA, and torch has got one of them
# wrong before (docs/upstream.md). The native run is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -m)" = x86_64 ] || { echo "each_cpu_isa: not an x86-64 CPU, nothing to vary"; exit 0; }
for isa in avx2 default; do
  echo "== ATEN_CPU_CAPABILITY=$isa"
  ATEN_CPU_CAPABILITY=$isa python -m pytest -q -m "not slow" -p no:cacheprovider \
    tests/test_backends.py tests/test_kernels.py tests/test_decode.py tests/test_output_check.py \
    tests/test_kernel_attention.py tests/test_nystrom.py tests/test_sparse.py tests/test_hf.py \
    tests/test_model_bench.py tests/test_context_parallel.py "$@"
done
