"""QLoRA on CPU: LoRA adapters on SmolLM2-135M with the base in fp32, NF4+DQ, NF4+DQ with LoftQ init, LLM.int8 and
ternary, and bitsandbytes 4-bit + PEFT, on the same data, seed and steps.

Train on the first 90% of shared/data/wikipedia-sample.txt, held-out perplexity on the first --eval-tokens of the
rest, before and after. Each run is a fresh process (its peak RSS is its own). Prints a Markdown table and writes
benchmarks/results/finetune.json.
With --eval-every N the held-out perplexity is also scored every N steps, and with --patience K a run stops once K
evaluations in a row did not improve on its best, keeping the best adapter (QLoRA at length, issue 36):
       python benchmarks/bench_finetune.py --runs fp32,nf4,nf4-loftq,int8 --steps 800 --eval-every 50 --patience 2
(runs resume from --workdir: a finished 300-step run given --steps 600 --save-every 300 goes on from step 300)
writes docs/img/finetune_curves.png too.
Usage: python benchmarks/bench_finetune.py [--steps 200] [--runs fp32,nf4,nf4-loftq,int8,ternary,bnb-nf4]
       [--bnb-steps 5] [--eval-every 0] [--patience 0]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikipedia-sample.txt"
RUNS = {
    "fp32": ("LoRA on the fp32 base", dict(method="fp32")),
    "nf4": ("QLoRA NF4+DQ", dict(method="nf4")),
    "nf4-loftq": ("QLoRA NF4+DQ, LoftQ init", dict(method="nf4", loftq=True)),
    "int8": ("QLoRA on LLM.int8", dict(method="int8")),
    "ternary": ("QLoRA on ternary (b1.58 PTQ)", dict(method="ternary")),
    "bnb-nf4": ("bitsandbytes NF4+DQ + PEFT", None),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady_step(times: list[float]) -> float:
    """Median step time, the first step (allocation, page faults) left out; NaN for a run read back that took no
    step in this process."""
    rest = sorted(times[1:] or times)
    return rest[len(rest) // 2] if rest else float("nan")


def one_lowbit(name: str, args) -> dict:
    from lowbit.app.finetune import FinetuneConfig, heldout_perplexity, train

    cfg = FinetuneConfig(**RUNS[name][1], steps=args.steps, batch=args.batch, seq=args.seq, rank=args.rank,
                         eval_tokens=args.eval_tokens, save_every=args.save_every or args.steps, lr=args.lr,
                         eval_every=args.eval_every, patience=args.patience, checkpointing=args.checkpointing)
    out = Path(args.workdir) / name
    t = time.perf_counter()
    s, model, held = train("smollm2-135m", WIKI.read_text(), out, cfg, progress=False)
    s["wall_seconds"] = time.perf_counter() - t
    s["peak_rss_mb"], s["steady_step_seconds"] = peak_rss_mb(), steady_step(s["step_times"])
    if cfg.method != "fp32":  # deployment (item 4): fold the adapters in, re-quantized and in full precision
        import copy

        from lowbit.train import merge_and_requantize, merge_to_full_precision

        model.eval()
        s["ppl_merged_requantized"] = heldout_perplexity(merge_and_requantize(copy.deepcopy(model)), held, cfg.seq,
                                                         cfg.eval_tokens)
        s["ppl_merged_fp32"] = heldout_perplexity(merge_to_full_precision(model), held, cfg.seq, cfg.eval_tokens)
    return s


def one_bnb(args) -> dict:
    """bitsandbytes' Linear4bit (training mode: its CPU path) under PEFT, same data, batches and adapters."""
    import bitsandbytes as bnb
    import peft

    from lowbit.app.finetune import FinetuneConfig, batch_at, heldout_perplexity, split_tokens
    from lowbit.app.models import load_default_model

    cfg = FinetuneConfig(steps=args.bnb_steps, batch=args.batch, seq=args.seq, rank=args.rank, lr=args.lr)
    model, tok = load_default_model()
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, blocksize=64)._quantize("cpu")
                setattr(m, child_name, layer)
    # PEFT's own checkpointing switch does nothing on transformers 5 (is_activation_checkpointing stays False):
    # turn it on the way the lowbit runs do, or this run skips the re-forward the others pay for.
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=cfg.targets,
                                                       lora_dropout=0.0))
    ids = tok(WIKI.read_text(), return_tensors="pt", verbose=False).input_ids[0]
    train, held = split_tokens(ids, cfg.heldout, cfg.seq)
    before = heldout_perplexity(model, held, cfg.seq, args.bnb_eval_tokens)
    from lowbit.optim import AdamW8bit

    opt = AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0, paged=True)
    model.train()
    times, losses = [], []
    for step in range(cfg.steps):
        t = time.perf_counter()
        batch = batch_at(train, step, cfg)
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    after = heldout_perplexity(model, held, cfg.seq, args.bnb_eval_tokens)
    return {"ppl_before": before, "ppl_after": after, "steps": cfg.steps, "losses": losses,
            "step_seconds": sum(times) / len(times), "steady_step_seconds": steady_step(times),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "heldout_tokens": args.bnb_eval_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--bnb-steps", type=int, default=5)
    ap.add_argument("--bnb-eval-tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="gradient checkpointing (off: a quarter less compute, more activation memory)")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every N steps too")
    ap.add_argument("--patience", type=int, default=0, help="stop after N evaluations without a new best")
    ap.add_argument("--save-every", type=int, default=0,
                    help="checkpoint every N steps (default: at the end); a run extended with more --steps resumes "
                         "only with the save-every it was started with")
    ap.add_argument("--workdir", default=str(Path(__file__).parent / "results" / "finetune-runs"))
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="bytes: serve allocations this large by mmap, fixed (glibc; as MALLOC_MMAP_THRESHOLD_=N): less "
                         "peak RSS, slower steps (docs/finetune.md)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.one:  # child process: one run, its JSON on the last line of stdout
        if args.mmap_threshold:  # every run alike
            from lowbit.app.allocator import return_freed_tensors

            return_freed_tensors(args.mmap_threshold)
        s = one_bnb(args) if args.one == "bnb-nf4" else one_lowbit(args.one, args)
        s.setdefault("peak_rss_mb", peak_rss_mb())
        print(json.dumps(s))
        return
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    print(f"{args.steps} steps of {args.batch} x {args.seq} tokens, rank {args.rank}, lr {args.lr}, paged AdamW8bit; "
          f"held-out: first {args.eval_tokens} tokens of the last 10% of wikipedia-sample.txt", flush=True)
    out = Path(__file__).parent / "results" / "finetune.json"
    # Runs of an earlier invocation with the same settings stay in the table, the JSON and the plot (a run can be
    # extended or redone alone).
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    same = {k: v for k, v in earlier.get("args", {}).items() if k != "runs"} == \
        {k: v for k, v in vars(args).items() if k != "runs"}
    results = {k: v for k, v in earlier.get("runs", {}).items() if k not in args.runs.split(",")} if same else {}
    passthrough = [(f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}") if isinstance(v, bool)
                   else f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("runs", "one")]
    for name in args.runs.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", name, *passthrough], capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{RUNS[name][0]}: ppl {r['ppl_before']:.3f} -> {r['ppl_after']:.3f}, {r['steady_step_seconds']:.2f} s/step, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), "args": vars(args), "runs": results}, indent=1))
    base = results.get("fp32")
    print("\n| run | steps | trainable params | held-out ppl before | after | after / LoRA fp32 | s/step (median) "
          "| step / LoRA fp32 | peak RSS MB | RSS / LoRA fp32 | merged, re-quantized ppl | merged, fp32 ppl |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        def rel(key: str) -> str:
            return f"{r[key] / base[key]:.3f}x" if base else ""

        merged = [f"{r[k]:.3f}" if k in r else "" for k in ("ppl_merged_requantized", "ppl_merged_fp32")]
        print(f"| {RUNS[name][0]} | {r['steps']} | {r['trainable_params'] / 1e6:.2f}M | {r['ppl_before']:.3f} | "
              f"{r['ppl_after']:.3f} | {rel('ppl_after')} | {r['steady_step_seconds']:.2f} | "
              f"{rel('steady_step_seconds')} | {r['peak_rss_mb']:.0f} | {rel('peak_rss_mb')} | {' | '.join(merged)} |")
    if args.eval_every:
        print("\nheld-out perplexity every", args.eval_every, "steps (best kept):")
        for name, r in results.items():
            evals = r.get("evals", [])
            print(f"  {RUNS[name][0]}: " + ", ".join(f"{e['step']}: {e['ppl']:.3f}" for e in evals)
                  + (f"; stopped at {r['stopped_at']}" if r.get("stopped_at") else "; ran all steps"))
        plot_curves(results, Path(__file__).resolve().parent.parent / "docs" / "img" / "finetune_curves.png")


def plot_curves(results: dict, path: Path) -> None:
    """Held-out perplexity against steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        points = [(0, r["ppl_before"])] + [(e["step"], e["ppl"]) for e in r.get("evals", [])]
        ax.plot([s for s, _ in points], [p for _, p in points], "o-", ms=3, label=RUNS[name][0])
    ax.set(xlabel="fine-tuning step", ylabel="held-out perplexity", yscale="log",
           title="LoRA / QLoRA on SmolLM2-135M at length (held-out part of the text)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
