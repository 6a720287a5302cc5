"""Prompt and decode speed of tern vs llama.cpp on the same GGUF files, same machine, one run.

llama.cpp comes from the PyPI package llama-cpp-python (built from source by pip, in a venv
outside the repo). Both use 2 threads, a prompt of --prompt-tokens tokens and --gen-tokens
greedy tokens. The two engines take turns, --rounds times per file (after one llama.cpp warm-up),
and the best run of each side is kept: this VM's speed drifts by 10-25% over tens of seconds,
and back-to-back blocks of one engine then the other turned that drift into the ratio.
Prints both rates and tern / llama.cpp ratios per file.

Files: each --gguf as given, plus, with --model HF_DIR, one GGUF per --types entry written by
`tern quantize` (so both engines read tern's output); with neither, the SmolLM2 Q4_1 GGUF.
--quantized-head adds a tern run with int8-rounded head activations (what llama.cpp does).

    python scripts/bench/vs_llamacpp.py [--model HF_DIR --types q8_0,q4_k] [--gguf FILE]...
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class LlamaCpp:
    """One llama.cpp model and prompt, timed one run at a time."""

    def __init__(self, gguf, threads, n_prompt, n_gen):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=512,
                         n_batch=512, verbose=False)
        text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. " * n_prompt
        self.toks = self.llm.tokenize(text.encode(), add_bos=False)[:n_prompt]
        self.n_gen = n_gen

    def run(self):
        """(prompt tok/s, decode tok/s) of one greedy generation."""
        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(self.toks)
        prefill = time.perf_counter() - t
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        t = time.perf_counter()
        for _ in range(self.n_gen - 1):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        decode = time.perf_counter() - t
        return len(self.toks) / prefill, (self.n_gen - 1) / decode


def tern_run(tern, gguf, n_prompt, n_gen, threads, extra):
    out = subprocess.check_output(
        [tern, "bench", "generate", "--model", gguf, "--prompt-tokens", str(n_prompt),
         "--gen-tokens", str(n_gen), *extra],
        text=True, env={**os.environ, "RAYON_NUM_THREADS": str(threads)})
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--tern", default=str(ROOT / "target/release/tern"))
    ap.add_argument("--model", help="float Hugging Face checkpoint to quantize with tern")
    ap.add_argument("--types", default="q8_0,q4_k")
    ap.add_argument("--gguf", action="append", default=[])
    ap.add_argument("--quantized-head", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    files = [(Path(g).name, g) for g in a.gguf]
    tmp = tempfile.TemporaryDirectory()
    if a.model:
        for t in [t for t in a.types.split(",") if t]:
            out = os.path.join(tmp.name, f"model-{t}.gguf")
            subprocess.run([a.tern, "quantize", "--model", a.model, "--out", out, "--type", t],
                           check=True, capture_output=True)
            files.append((f"{t} (tern quantize)", out))
    if not files:
        gguf = subprocess.check_output([str(ROOT / "scripts/fetch-smollm2.sh")], text=True).strip()
        files.append((Path(gguf).name, gguf))
    heads = [("exact head", [])] + ([("quantized head", ["--quantized-head"])] if a.quantized_head else [])
    results = []
    for name, gguf in files:
        llama = LlamaCpp(gguf, a.threads, a.prompt_tokens, a.gen_tokens)
        llama.run()  # warm-up
        lp, ld = 0.0, 0.0
        best = {label: None for label, _ in heads}
        for _ in range(a.rounds):
            p, d = llama.run()
            lp, ld = max(lp, p), max(ld, d)
            for label, extra in heads:
                r = tern_run(a.tern, gguf, a.prompt_tokens, a.gen_tokens, a.threads, extra)
                b = best[label]
                best[label] = r if b is None else {
                    **r, "prompt_tok_s": max(b["prompt_tok_s"], r["prompt_tok_s"]),
                    "decode_tok_s": max(b["decode_tok_s"], r["decode_tok_s"]),
                    "peak_rss_mb": max(b["peak_rss_mb"], r["peak_rss_mb"])}
        del llama
        print(f"{name}: llama.cpp prompt {lp:.1f} tok/s, decode {ld:.1f} tok/s")
        result = {"file": name, "llamacpp_prompt_tok_s": lp, "llamacpp_decode_tok_s": ld}
        for label, _ in heads:
            r = best[label]
            print(f"  tern ({label}): prompt {r['prompt_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB; ratio prompt {r['prompt_tok_s'] / lp:.2f}, "
                  f"decode {r['decode_tok_s'] / ld:.2f}", flush=True)
            key = label.replace(" ", "_")
            result[f"tern_{key}_decode_tok_s"] = r["decode_tok_s"]
            result[f"tern_{key}_prompt_tok_s"] = r["prompt_tok_s"]
            result[f"ratio_decode_{key}"] = r["decode_tok_s"] / ld
            result[f"ratio_prompt_{key}"] = r["prompt_tok_s"] / lp
        results.append(result)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
