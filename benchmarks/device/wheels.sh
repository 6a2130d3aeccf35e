#!/usr/bin/env bash
# Download the wheels the GPU box lacks (benchmarks/device/wheels.txt) for its Python 3.12 on
# x86-64 Linux, into DIR (default: .whl in the repository root, which git ignores).
# Run where pip reaches PyPI:  benchmarks/device/wheels.sh [DIR]
# Then carry DIR to the box and install there with benchmarks/device/run_gpu.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dest="${1:-$root/.whl}"
python="${PYTHON:-python3}"
mkdir -p "$dest"
platforms=()
# pip matches manylinux_2_N exactly: offer every N the box's glibc can take
for n in 39 35 34 31 28 27 24 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
grep -v '^\s*#' "$here/wheels.txt" | grep -v '^\s*$' | while read -r requirement; do
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "$requirement"
done
count=$(ls "$dest"/*.whl | wc -l)
size=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "$count wheels, $((size / 1024 / 1024)) MiB in $dest" >&2
if [ "$size" -gt $((40 * 1024 * 1024)) ]; then
  echo "more than 40 MiB: the device's working tree limit is 64 MiB in all" >&2
  exit 1
fi
