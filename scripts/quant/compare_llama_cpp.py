#!/usr/bin/env python3
"""tern vs llama.cpp on the same GGUF files, in one run: prompt and decode tokens/s.

For each type, `tern quantize` writes the GGUF from a float Hugging Face checkpoint (or a
GGUF file is given as is); then `tern bench generate` and llama.cpp (through the PyPI package
`llama-cpp-python`, which builds it from source) run the same prompt length and decode
length on the same file with the same thread count, and the ratios are printed.

llama.cpp's figures are its own counters (`llama_perf_context`: time inside eval only); tern's
decode rate is the wall time of the whole call after the first token (sampling and
detokenisation included), so the comparison leans towards llama.cpp.

    python scripts/quant/compare_llama_cpp.py --model HF_DIR --types q8_0,q4_k \
        --gguf ~/.cache/tern/SmolLM2-135M-Instruct.Q4_1.gguf --tern target/release/tern
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def tern_bench(tern, path, prompt_tokens, gen_tokens, runs):
    out = subprocess.run(
        [tern, "bench", "generate", "--model", path, "--prompt-tokens", str(prompt_tokens),
         "--gen-tokens", str(gen_tokens), "--runs", str(runs)],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def llama_bench(path, prompt_tokens, gen_tokens, runs, threads):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=prompt_tokens + gen_tokens + 16,
                          n_threads=threads, n_threads_batch=threads, n_batch=512,
                          verbose=False)
    text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. " * prompt_tokens
    ids = llm.tokenize(text.encode(), add_bos=False)[:prompt_tokens]
    best_p, best_d = 0.0, 0.0
    for _ in range(runs + 1):  # the first run warms up
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        llm.eval(ids)
        tok = llm.sample(temp=0.0)
        for _ in range(gen_tokens - 1):
            llm.eval([tok])
            tok = llm.sample(temp=0.0)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        p = perf.n_p_eval / (perf.t_p_eval_ms / 1e3)
        d = perf.n_eval / (perf.t_eval_ms / 1e3)
        best_p, best_d = max(best_p, p), max(best_d, d)
    del llm
    return {"prompt_tok_s": best_p, "decode_tok_s": best_d}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="float Hugging Face checkpoint to quantize")
    ap.add_argument("--types", default="q8_0,q4_k")
    ap.add_argument("--gguf", action="append", default=[], help="GGUF file to compare as is")
    ap.add_argument("--tern", default="target/release/tern")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    if a.threads != os.cpu_count():
        print(f"note: tern uses every core ({os.cpu_count()}); --threads {a.threads} is llama.cpp's",
              file=sys.stderr)
    files = [(os.path.basename(g), g) for g in a.gguf]
    tmp = tempfile.TemporaryDirectory()
    if a.model:
        for t in [t for t in a.types.split(",") if t]:
            out = os.path.join(tmp.name, f"model-{t}.gguf")
            subprocess.run([a.tern, "quantize", "--model", a.model, "--out", out, "--type", t],
                           check=True, capture_output=True)
            files.append((f"{t} (tern quantize)", out))
    rows = []
    for label, path in files:
        tr = tern_bench(a.tern, path, a.prompt_tokens, a.gen_tokens, a.runs)
        lr = llama_bench(path, a.prompt_tokens, a.gen_tokens, a.runs, a.threads)
        rows.append((label, tr, lr))
        print(f"{label:<40} decode tern {tr['decode_tok_s']:7.1f} llama.cpp {lr['decode_tok_s']:7.1f} "
              f"ratio {tr['decode_tok_s'] / lr['decode_tok_s']:.2f} | prompt tern {tr['prompt_tok_s']:7.1f} "
              f"llama.cpp {lr['prompt_tok_s']:7.1f} ratio {tr['prompt_tok_s'] / lr['prompt_tok_s']:.2f} "
              f"| tern peak RSS {tr['peak_rss_mb']:.0f} MB", flush=True)
    print(json.dumps([{"file": l, "tern": t, "llama_cpp": r} for l, t, r in rows]))


if __name__ == "__main__":
    main()
