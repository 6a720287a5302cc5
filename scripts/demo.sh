#!/usr/bin/env bash
# The tern demo: fetch SmolLM2-135M-Instruct (GGUF, cached), ask it three questions, LoRA-train
# it for about two minutes on CPU on data/demo/pirate.jsonl (44 chats answered as a pirate),
# and ask again with the adapter. Questions are not in the training data.
#
#   scripts/demo.sh            # uses ./target/release/tern, building it if missing
#   TERN=path/to/tern scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TERN=${TERN:-./target/release/tern}
[ -x "$TERN" ] || cargo build --release
MODEL=$(scripts/fetch-smollm2.sh)
OUT=${TERN_CACHE:-$HOME/.cache/tern}/demo-pirate-adapter
QUESTIONS=("What is the capital of Spain?" "What sound does a pig make?" "What is 3 plus 4?")

ask() {
  for q in "${QUESTIONS[@]}"; do
    printf '  Q: %s\n  A: ' "$q"
    "$TERN" generate --model "$MODEL" --chat "$q" --temperature 0 --max-tokens 40 "$@"
  done
}

echo "== SmolLM2-135M-Instruct, as shipped =="
ask
echo
echo "== LoRA training on data/demo/pirate.jsonl (rank 16, 3 epochs) =="
"$TERN" train --model "$MODEL" --data data/demo/pirate.jsonl --out "$OUT" \
  --epochs 3 --batch-size 4 --lr 1e-3 --rank 16 --warmup-ratio 0.1 --force
echo
echo "== The same questions, with the adapter ($OUT) =="
ask --adapter "$OUT"
