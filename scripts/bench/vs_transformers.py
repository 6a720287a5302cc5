"""Decode speed of tern vs Hugging Face transformers on the same weights, same machine, one run.

Both run SmolLM2-135M-Instruct in f32 on the CPU with greedy decoding: transformers loads the
Q4_1 GGUF (dequantizing to f32) and we save that as a Hugging Face directory, which tern then
loads, so the two run identical weights. Prints both rates and the ratio tern / transformers.

    python scripts/bench/vs_transformers.py [--threads 2] [--prompt-tokens 128] [--gen-tokens 64]

Needs torch, transformers and gguf (pip, in a venv outside the repo) and a release build of
tern (`cargo build --release`).
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ensure_hf_dir():
    """SmolLM2's Q4_1 GGUF dequantized to an f32 Hugging Face directory (made once, cached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = subprocess.check_output([str(ROOT / "scripts/fetch-smollm2.sh")], text=True).strip()
    hf_dir = Path(gguf).with_suffix(".hf-f32")
    if not (hf_dir / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(Path(gguf).parent, gguf_file=Path(gguf).name)
        m = AutoModelForCausalLM.from_pretrained(Path(gguf).parent, gguf_file=Path(gguf).name, dtype=torch.float32)
        tmp = hf_dir.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        # transformers refuses save_pretrained on GGUF-loaded models; the weights are plain
        # f32 by now, so write them, the config and the tokenizer ourselves.
        from safetensors.torch import save_file
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        if m.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        m.config.save_pretrained(tmp)
        m.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, hf_dir)
    return hf_dir


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--tern", default=str(ROOT / "target/release/tern"))
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    hf_dir = ensure_hf_dir()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. " * a.prompt_tokens
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, : a.prompt_tokens]

    def timed(n):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            best = min(best, time.perf_counter() - t)
        return best

    # Parity on the real model: greedy continuation of a chat prompt, ids and logprobs.
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    chat_ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        g = model.generate(chat_ids, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    hf_ids = g.sequences[0, chat_ids.shape[1]:].tolist()
    hf_lp = [torch.log_softmax(l[0].float(), -1)[i].item() for l, i in zip(g.logits, hf_ids)]
    lines = subprocess.check_output(
        [a.tern, "generate", "--model", str(hf_dir), "--chat", chat[0]["content"], "--temperature", "0",
         "--max-tokens", "16", "--output", "jsonl"], text=True).strip().splitlines()
    tern_tokens = [json.loads(l) for l in lines[:-1]]
    n = min(len(tern_tokens), len(hf_ids))
    same = [t["id"] for t in tern_tokens[:n]] == hf_ids[:n]
    lp_diff = max(abs(t["logprob"] - h) for t, h in zip(tern_tokens[:n], hf_lp[:n]))
    print(f"parity: greedy ids identical over {n} tokens: {same}; max |logprob diff| {lp_diff:.2e}; "
          f"text {tok.decode(hf_ids, skip_special_tokens=True)!r}")

    timed(2)  # warm-up
    t1, tn = timed(1), timed(a.gen_tokens)
    hf_decode = (a.gen_tokens - 1) / (tn - t1)

    out = subprocess.check_output(
        [a.tern, "bench", "generate", "--model", str(hf_dir), "--prompt-tokens", str(a.prompt_tokens),
         "--gen-tokens", str(a.gen_tokens)],
        text=True,
        env={**os.environ, "RAYON_NUM_THREADS": str(a.threads)},
    )
    tern = json.loads(out.strip().splitlines()[-1])
    print(f"transformers {torch.__version__} / {__import__('transformers').__version__}: "
          f"decode {hf_decode:.1f} tok/s, prefill {a.prompt_tokens / t1:.1f} tok/s (incl. first token)")
    print(f"tern: decode {tern['decode_tok_s']:.1f} tok/s, prefill {tern['prompt_tok_s']:.1f} tok/s")
    print(json.dumps({"hf_decode_tok_s": hf_decode, "tern_decode_tok_s": tern["decode_tok_s"],
                      "ratio_decode": tern["decode_tok_s"] / hf_decode,
                      "ratio_prefill": tern["prompt_tok_s"] / (a.prompt_tokens / t1)}))


if __name__ == "__main__":
    sys.exit(main())
