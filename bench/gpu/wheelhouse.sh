#!/usr/bin/env bash
# Downloads the wheels of bench/gpu/wheels.txt for an offline node's Python, on a machine with
# internet (or a package mirror):
#   bash bench/gpu/wheelhouse.sh [DIR] [PYTHON_VERSION]      (defaults: .whl 3.12)
# then copy the repository with DIR to the node; bench/gpu/recipe.sh installs from it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-.whl}
py=${2:-3.12}
mkdir -p "$dir"
mapfile -t pkgs < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/wheels.txt" | grep -v -e '^$' -e '^antlr4')
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${plat[@]}" -d "$dir" "${pkgs[@]}"
antlr=$(grep -o '^antlr4[^ #]*' "$here/wheels.txt")  # ships only as a source archive
python3 -m pip wheel -q --no-deps -w "$dir" "$antlr"
du -sh "$dir"
