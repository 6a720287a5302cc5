"""Prompt and decode speed of tern vs llama.cpp on the same GGUF, same machine, one run.

llama.cpp comes from the PyPI package llama-cpp-python (built from source by pip, in a venv
outside the repo). Both use 2 threads, a prompt of --prompt-tokens tokens and --gen-tokens
greedy tokens; the best of 3 runs is kept on each side. Prints both rates and tern / llama.cpp
ratios, for tern's default exact output head and for --quantized-head (what llama.cpp does).

    python scripts/bench/vs_llamacpp.py [--threads 2] [--prompt-tokens 128] [--gen-tokens 64]
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def llamacpp_rates(gguf, threads, n_prompt, n_gen):
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512, verbose=False)
    text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. " * n_prompt
    toks = llm.tokenize(text.encode(), add_bos=False)[:n_prompt]
    best_p, best_d = 0.0, 0.0
    for _ in range(4):  # first run is a warm-up
        llm.reset()
        t = time.perf_counter()
        llm.eval(toks)
        prefill = time.perf_counter() - t
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        t = time.perf_counter()
        for _ in range(n_gen - 1):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        decode = time.perf_counter() - t
        best_p, best_d = max(best_p, len(toks) / prefill), max(best_d, (n_gen - 1) / decode)
    return best_p, best_d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--tern", default=str(ROOT / "target/release/tern"))
    a = ap.parse_args()
    gguf = subprocess.check_output([str(ROOT / "scripts/fetch-smollm2.sh")], text=True).strip()
    lp, ld = llamacpp_rates(gguf, a.threads, a.prompt_tokens, a.gen_tokens)
    print(f"llama.cpp: prompt {lp:.1f} tok/s, decode {ld:.1f} tok/s")
    result = {"llamacpp_prompt_tok_s": lp, "llamacpp_decode_tok_s": ld}
    for label, extra in [("exact head", []), ("quantized head", ["--quantized-head"])]:
        out = subprocess.check_output(
            [a.tern, "bench", "generate", "--model", gguf, "--prompt-tokens", str(a.prompt_tokens),
             "--gen-tokens", str(a.gen_tokens), *extra],
            text=True, env={**os.environ, "RAYON_NUM_THREADS": str(a.threads)})
        r = json.loads(out.strip().splitlines()[-1])
        print(f"tern ({label}): prompt {r['prompt_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s; "
              f"ratio prompt {r['prompt_tok_s'] / lp:.2f}, decode {r['decode_tok_s'] / ld:.2f}")
        key = label.replace(" ", "_")
        result[f"tern_{key}_decode_tok_s"] = r["decode_tok_s"]
        result[f"ratio_decode_{key}"] = r["decode_tok_s"] / ld
        result[f"ratio_prompt_{key}"] = r["prompt_tok_s"] / lp
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
