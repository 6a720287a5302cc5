"""LoRA on a real model: tern vs transformers + PEFT on the same weights and adapter, one run.

SmolLM2-135M-Instruct in f32 (the Q4_1 GGUF dequantized, as in vs_transformers.py) with a
seeded random r=16 all-linear PEFT adapter (non-zero B, written by PEFT to the cache):

  1. parity: greedy ids and log-probs of a chat answer, PEFT vs `tern generate --adapter`,
     and vs the checkpoint `tern merge` writes;
  2. speed: decode tok/s base and unmerged adapter, PEFT vs `tern bench adapters`, and the
     ratio tern / PEFT.

    python scripts/bench/vs_peft.py [--threads 2] [--prompt-tokens 32] [--gen-tokens 64]

Needs torch, transformers, peft and gguf (pip, in a venv outside the repo) and a release
build of tern (`cargo build --release`).
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_transformers import ROOT, ensure_hf_dir  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--tern", default=str(ROOT / "target/release/tern"))
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    hf_dir = ensure_hf_dir()
    adir = hf_dir.with_name("smollm2-lora-r16-all-linear")
    if not (adir / "adapter_model.safetensors").exists():
        base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        m = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * 0.02)
        m.save_pretrained(adir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adir).eval()

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    chat_ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True)["input_ids"]
    with torch.no_grad():
        g = model.generate(chat_ids, max_new_tokens=16, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    ref_ids = g.sequences[0, chat_ids.shape[1]:].tolist()
    ref_lp = [torch.log_softmax(l[0].float(), -1)[i].item() for l, i in zip(g.logits, ref_ids)]
    # PeftModel injects its layers into `base`, so the base alone runs with them disabled.
    with torch.no_grad(), model.disable_adapter():
        base_ids = model.generate(chat_ids, max_new_tokens=16, do_sample=False)[0, chat_ids.shape[1]:].tolist()

    def tern_ids(model_path, extra=()):
        lines = subprocess.check_output(
            [a.tern, "generate", "--model", str(model_path), "--chat", chat[0]["content"],
             "--temperature", "0", "--max-tokens", "16", "--output", "jsonl", *extra],
            text=True).strip().splitlines()
        return [json.loads(l) for l in lines[:-1]]

    def report(label, toks):
        n = min(len(toks), len(ref_ids))
        same = [t["id"] for t in toks[:n]] == ref_ids[:n]
        diff = max(abs(t["logprob"] - h) for t, h in zip(toks[:n], ref_lp[:n]))
        print(f"parity {label}: greedy ids identical over {n} tokens: {same}; "
              f"max |logprob diff| {diff:.2e}")
        return same, diff

    print(f"peft answer: {tok.decode(ref_ids, skip_special_tokens=True)!r} "
          f"(base: {tok.decode(base_ids, skip_special_tokens=True)!r})")
    unmerged = report("tern --adapter", tern_ids(hf_dir, ["--adapter", str(adir)]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "merged"
        subprocess.check_call([a.tern, "merge", "--model", str(hf_dir), "--adapter", str(adir),
                               "--out", str(out)], stdout=subprocess.DEVNULL)
        merged = report("tern merge", tern_ids(out))

    text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. " * a.prompt_tokens
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, : a.prompt_tokens]

    def decode_rate(m):
        def timed(n):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                with torch.no_grad():
                    m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                best = min(best, time.perf_counter() - t)
            return best
        timed(2)
        t1, tn = timed(1), timed(a.gen_tokens)
        return (a.gen_tokens - 1) / (tn - t1)

    peft_lora = decode_rate(model)
    with model.disable_adapter():
        peft_base = decode_rate(model)
    out = subprocess.check_output(
        [a.tern, "bench", "adapters", "--model", str(hf_dir), "--adapter", str(adir),
         "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--runs", "5"],
        text=True, env={**os.environ, "RAYON_NUM_THREADS": str(a.threads)}, stderr=subprocess.DEVNULL)
    t = json.loads(out.strip().splitlines()[-1])
    print(f"peft {__import__('peft').__version__}: decode base {peft_base:.1f} tok/s, "
          f"unmerged {peft_lora:.1f} tok/s ({(peft_lora / peft_base - 1) * 100:+.1f} %)")
    print(f"tern: decode base {t['decode_base_tok_s']:.1f} tok/s, unmerged "
          f"{t['decode_unmerged_tok_s']:.1f} tok/s ({-t['unmerged_overhead_pct']:+.1f} %), "
          f"merged {t['decode_merged_tok_s']:.1f}, switch {t['switch_ns']:.0f} ns, load {t['load_ms']:.1f} ms")
    print(json.dumps({"parity_unmerged_ids": unmerged[0], "parity_unmerged_lp": unmerged[1],
                      "parity_merged_ids": merged[0], "parity_merged_lp": merged[1],
                      "peft_base_tok_s": peft_base, "peft_unmerged_tok_s": peft_lora,
                      "tern_base_tok_s": t["decode_base_tok_s"],
                      "tern_unmerged_tok_s": t["decode_unmerged_tok_s"],
                      "ratio_unmerged": t["decode_unmerged_tok_s"] / peft_lora}))
    return 0 if unmerged[0] and merged[0] else 1


if __name__ == "__main__":
    sys.exit(main())
