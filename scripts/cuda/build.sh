#!/usr/bin/env bash
# Builds tern with `--features cuda` on a machine without a GPU, for an NVIDIA GPU machine
# (default: compute capability 9.0, H100/H200; CUDA 13.0 to match driver 580).
#
#   scripts/cuda/build.sh            # -> dist/cuda/{tern.gz, tests/cuda.gz, MANIFEST}
#
# What the build needs comes from PyPI wheels, installed into a venv outside the repo
# ($TERN_CUDA_VENV, default ~/venvs/cuda13, ~1.2 GB): nvcc, the CUDA headers and the libraries
# candle links (cudart, cublas, curand, nvrtc). No wheel ships libcuda (the driver), so a stub
# exporting the driver symbols cudarc declares is built for the link; at run time the GPU
# machine's real driver is used. Outputs go to their own target directory (target/cuda), so the
# CPU build is untouched. The binaries need libcuda.so.1, libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10 and libcudart.so.13 at run time (scripts/cuda/run_gpu.sh finds them there).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${TERN_CUDA_VENV:-$HOME/venvs/cuda13}"
CAP="${CUDA_COMPUTE_CAP:-90}"
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88
        nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88
        nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${WHEELS[@]}"
CU="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
[ -x "$CU/bin/nvcc" ] || { echo "nvcc not found under $CU/bin" >&2; exit 1; }

# The wheels ship only versioned sonames; the linker looks for the plain names.
for lib in cublas cublasLt nvrtc cudart curand; do
  so="$(ls "$CU/lib/lib$lib.so."* 2>/dev/null | sort | head -1 || true)"
  [ -n "$so" ] || { echo "lib$lib.so.* not found in $CU/lib" >&2; exit 1; }
  ln -sf "$(basename "$so")" "$CU/lib/lib$lib.so"
done

cd "$ROOT"
export CARGO_TARGET_DIR="$ROOT/target/cuda"
export PATH="$CU/bin:$PATH" CUDA_HOME="$CU" CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_COMPUTE_CAP="$CAP"
export LIBRARY_PATH="$CU/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"

# A link-time stand-in for libcuda.so.1: every cu* function cudarc's driver bindings declare.
cargo fetch -q
CUDARC="$(cargo metadata --format-version 1 --features tern-cli/cuda 2>/dev/null |
  "$VENV/bin/python" -c 'import json,sys; m=json.load(sys.stdin); print([p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc"][0].rsplit("/",1)[0])')"
STUB="$CU/lib/libcuda.so"
if [ ! -e "$STUB" ]; then
  grep -rhoE 'fn cu[A-Za-z0-9_]+' "$CUDARC/src/driver/sys" | sed 's/^fn //' | sort -u |
    awk '{print "void " $1 "(void) {}"}' > "$CU/lib/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$CU/lib/cuda_stub.c"
fi

cargo build --release --features cuda -p tern-cli
# Only the GPU-vs-CPU tests: the rest assume CPU kernels, and the device tool carries 64 MiB.
cargo test --release --features cuda --no-run --message-format=json -p tern --test cuda 2>/dev/null |
  "$VENV/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' > "$CARGO_TARGET_DIR/test-executables.txt"

# It starts here (the stub stands in for the driver; nothing touches a GPU).
SMOKE="$(mktemp -d)"
ln -s "$STUB" "$SMOKE/libcuda.so.1"
LD_LIBRARY_PATH="$SMOKE:$CU/lib" "$CARGO_TARGET_DIR/release/tern" --version

# Stripped and gzipped: the PTX of candle's kernels makes each binary ~65-70 MB, over what the
# device tool carries (64 MiB); compressed, both together are ~35 MB.
DIST="$ROOT/dist/cuda"
rm -rf "$DIST" && mkdir -p "$DIST/tests"
cp "$CARGO_TARGET_DIR/release/tern" "$DIST/tern"
while read -r exe; do
  cp "$exe" "$DIST/tests/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"
done < "$CARGO_TARGET_DIR/test-executables.txt"
strip "$DIST/tern" "$DIST"/tests/*
{
  echo "built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD), compute capability $CAP"
  echo "nvcc: $(nvcc --version | tail -1)"
  echo "needs at run time:"; ldd "$DIST/tern" | grep -E 'cuda|cublas|curand|nvrtc' || true
} > "$DIST/MANIFEST"
gzip -9 "$DIST/tern" "$DIST"/tests/*
ls -l "$DIST" "$DIST/tests" >> "$DIST/MANIFEST"
cat "$DIST/MANIFEST"
