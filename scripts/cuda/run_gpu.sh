#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, what scripts/cuda/build.sh built:
# the CUDA tests (GPU paths against their CPU twins and the references) and `tern bench
# generate` on a fixture model, writing everything to ${OUT:-dist/cuda/report}.
#
#   scripts/cuda/run_gpu.sh          # needs dist/cuda (carry it: `carry: ["dist/cuda"]`)
#
# The CUDA libraries come from the machine's Python (PyTorch's nvidia-* cu13 wheels) and the
# driver from the system; the test binaries find their fixtures under the path they were built
# in (/work/main), which is linked to this checkout when it differs.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIST="$ROOT/dist/cuda"
REPORT="${OUT:-$DIST/report}"
mkdir -p "$REPORT"
[ -f "$DIST/tern.gz" ] || { echo "no $DIST/tern.gz: run scripts/cuda/build.sh first and carry dist/cuda" >&2; exit 1; }
BIN="$(mktemp -d)"
mkdir -p "$BIN/tests"
gunzip -c "$DIST/tern.gz" > "$BIN/tern"
for t in "$DIST"/tests/*.gz; do gunzip -c "$t" > "$BIN/tests/$(basename "$t" .gz)"; done
chmod +x "$BIN/tern" "$BIN"/tests/*
CU="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="${CU:+$CU:}/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BUILT_IN=/work/main
if [ "$ROOT" != "$BUILT_IN" ] && [ ! -e "$BUILT_IN" ]; then
  mkdir -p "$(dirname "$BUILT_IN")" && ln -s "$ROOT" "$BUILT_IN"
fi
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
  cat "$DIST/MANIFEST" 2>/dev/null | head -3
  ldd "$BIN/tern" | grep -E 'cuda|cublas|curand|nvrtc'
} > "$REPORT/summary.txt" 2>&1
status=0
for t in "$BIN"/tests/*; do
  name="$(basename "$t")"
  echo "== $name" >> "$REPORT/summary.txt"
  "$t" --test-threads 1 > "$REPORT/test-$name.log" 2>&1 || status=1
  grep -E '^test result|FAILED|panicked' "$REPORT/test-$name.log" >> "$REPORT/summary.txt"
done
for m in llama qwen2; do
  echo "== bench generate $m (f32, GPU)" >> "$REPORT/summary.txt"
  "$BIN/tern" bench generate --model "$ROOT/crates/tern/tests/fixtures/models/$m" \
    --prompt-tokens 64 --gen-tokens 64 >> "$REPORT/summary.txt" 2>&1 || status=1
done
cat "$REPORT/summary.txt"
exit $status
