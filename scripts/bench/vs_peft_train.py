"""LoRA training speed and memory: tern vs transformers + PEFT, same recipe, one run.

SmolLM2-135M-Instruct in f32 (the Q4_1 GGUF dequantized, as in vs_transformers.py), rank 16
on every linear layer, batch 4 x 128 tokens, AdamW, full-sequence loss; both sides train the
same synthetic text. Prints tokens/s and peak RSS of each side and the ratios.

    python scripts/bench/vs_peft_train.py [--threads 2] [--steps 3] [--rounds 3] \
        [--half bf16|f16 [--peft-f32]]

`--half bf16` (or `--bf16`) runs tern with --bf16-matmul and PEFT under torch's bf16 CPU
autocast; `--half f16`, tern with --f16-matmul and PEFT under fp16 autocast. `--peft-f32`
keeps PEFT in f32, its default recipe.

Each round runs PEFT and then tern, each in a fresh process; rounds interleave so that a
shared machine's drift hits both sides alike. The ratio is taken per round and the median
reported, with the range.

Needs torch, transformers, peft and gguf (pip, in a venv outside the repo) and a release
build of tern (`cargo build --release`). PEFT runs in a child process so its peak RSS is its
own.
"""
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_transformers import ROOT, ensure_hf_dir  # noqa: E402


def peft_side(hf_dir, threads, steps, rank, batch, seq, half):
    import contextlib
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. " * seq
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :seq].repeat(batch, 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    # half: torch's CPU autocast, the Python stack's counterpart of --bf16-matmul and
    # --f16-matmul (matmuls at half width; weights, adapter and optimizer in f32).
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(half)
    cast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext

    def step():
        with cast():
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t) / steps
    return {"tokens_per_s": batch * seq / dt, "step_s": dt,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--half", choices=["bf16", "f16"],
                    help="base products at half width on both sides: tern --bf16-matmul or "
                         "--f16-matmul, PEFT under torch.autocast(cpu, bfloat16 or float16)")
    ap.add_argument("--bf16", action="store_const", const="bf16", dest="half",
                    help="the same as --half bf16")
    ap.add_argument("--peft-f32", action="store_true",
                    help="with --half: PEFT stays in f32 (its default recipe)")
    ap.add_argument("--tern", default=str(ROOT / "target/release/tern"))
    ap.add_argument("--peft-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    rank, batch, seq = 16, 4, 128
    if a.peft_child:
        print(json.dumps(peft_side(a.peft_child, a.threads, a.steps, rank, batch, seq, a.half)))
        return 0
    hf_dir = ensure_hf_dir()
    rows = []
    for r in range(a.rounds):
        peft = json.loads(subprocess.check_output(
            [sys.executable, __file__, "--peft-child", str(hf_dir), "--threads", str(a.threads),
             "--steps", str(a.steps)] + (["--half", a.half] if a.half and not a.peft_f32 else []),
            text=True, stderr=subprocess.DEVNULL).strip().splitlines()[-1])
        out = subprocess.check_output(
            [a.tern, "bench", "train", "--model", str(hf_dir), "--rank", str(rank), "--batch",
             str(batch), "--seq-len", str(seq), "--steps", str(a.steps)]
            + ([f"--{a.half}-matmul"] if a.half else []),
            text=True, env={**os.environ, "RAYON_NUM_THREADS": str(a.threads)},
            stderr=subprocess.DEVNULL)
        tern = json.loads(out.strip().splitlines()[-1])
        rows.append({"peft": peft, "tern": tern,
                     "ratio_tokens_per_s": tern["tokens_per_s"] / peft["tokens_per_s"],
                     "ratio_peak_rss": tern["peak_rss_mb"] / peft["peak_rss_mb"]})
        print(f"round {r + 1}: peft {peft['tokens_per_s']:.1f} tok/s, {peft['peak_rss_mb']:.0f} MB; "
              f"tern {tern['tokens_per_s']:.1f} tok/s, {tern['peak_rss_mb']:.0f} MB; "
              f"ratio {rows[-1]['ratio_tokens_per_s']:.2f}x", flush=True)
    ratios = sorted(x["ratio_tokens_per_s"] for x in rows)
    rss = sorted(x["ratio_peak_rss"] for x in rows)
    print(f"peft {__import__('peft').__version__} vs tern: tokens/s ratio {ratios[len(ratios) // 2]:.2f}x "
          f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}), peak RSS ratio {rss[len(rss) // 2]:.2f}")
    print(json.dumps({"rounds": rows, "ratio_tokens_per_s": ratios[len(ratios) // 2],
                      "ratio_peak_rss": rss[len(rss) // 2]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
