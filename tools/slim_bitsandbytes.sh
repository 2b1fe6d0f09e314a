#!/usr/bin/env bash
# Write a copy of bitsandbytes' wheel that keeps only its CPU library and the CUDA 13.0 one (what the lent H200's
# torch 2.11+cu130 loads), so that it fits the device tool's 64 MiB transfer beside the checkout and the other wheels.
# The full wheel (43 MB) carries a library for every CUDA, ROCm and XPU version. RECORD loses the removed files' lines.
# Usage: tools/slim_bitsandbytes.sh WHEEL_FOLDER   (downloads bitsandbytes==0.50.2 for Python 3.12 into it)
set -euo pipefail
out="$(cd "${1:?wheel folder}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_24_x86_64 -d "$work" bitsandbytes==0.50.2
wheel="$(ls "$work"/bitsandbytes-*.whl)"
mkdir "$work/tree" && (cd "$work/tree" && python3 -m zipfile -e "$wheel" .)
keep='libbitsandbytes_(cpu|cuda130)\.so'
find "$work/tree/bitsandbytes" -name 'libbitsandbytes_*.so' | grep -v -E "$keep" | xargs rm -f
record="$(ls -d "$work"/tree/*.dist-info)/RECORD"
grep -v -E 'libbitsandbytes_' "$record" > "$record.new" || true
grep -E "$keep" "$record" >> "$record.new"
mv "$record.new" "$record"
rm -f "$out/$(basename "$wheel")"
(cd "$work/tree" && python3 -m zipfile -c "$out/$(basename "$wheel")" ./*)
ls -la "$out/$(basename "$wheel")"
