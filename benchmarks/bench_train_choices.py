"""Which training choices make a model quantize well (Ahmadian et al., "Intriguing properties of quantization at
scale", 2023), reproduced small: Study A of issue 37.

One harness model (--size, fp32 weights) trained on the built corpus with the same tokens, batches and seed under
each variant of a fractional design: the recipe the paper found robust (weight decay 0.1, no dropout, gradient
clipping at 1.0, bf16 autocast), each of its four choices flipped alone (weight decay 0, dropout 0.1, no clipping,
fp32 or fp16 autocast with loss scaling), and all four flipped together. Each trained model is then quantized by
  - W8A8 per-row: int8 weights per output row, int8 activations per token, no outlier split (the paper's quantizer),
  - LLM.int8 (the same with |x| >= 6 columns in float),
  - NF4 (blocks of 64, double quantization),
  - int4 and int3, round-to-nearest in groups of 128 (a row of a 64-wide input is one group),
and scored on the held-out tokens: the relative perplexity degradation, the largest activation magnitude entering
the hidden-width linear layers, and the outlier features by `lowbit outliers`' criteria (|x| >= 6 in >= 25% of the
layers and >= 6% of the positions). The bf16 and fp16 variants are also quantized at each save, for the
degradation against training steps (the paper: fp16-trained models degrade more the longer they train).

Writes benchmarks/results/train_choices.json and docs/img/train_choices_steps.png; runs resume (a finished
variant's summary.json is read back). Single seed.
Usage: python benchmarks/bench_train_choices.py [--size micro] [--tokens-per-param 20] [--lr 1.6e-2]
       [--variants baseline,wd0,dropout,noclip,fp32,fp16,all-flipped]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = dict(weight_decay=0.1, dropout=0.0, clip=1.0, precision="bf16")  # what the paper found robust
VARIANTS = {
    "baseline": {},
    "wd0": dict(weight_decay=0.0),
    "dropout": dict(dropout=0.1),
    "noclip": dict(clip=None),
    "fp32": dict(precision="fp32"),
    "fp16": dict(precision="fp16"),
    "all-flipped": dict(weight_decay=0.0, dropout=0.1, clip=None, precision="fp16"),
}
METHODS = {  # label -> (lowbit method, overrides)
    "W8A8 per-row": ("int8-absmax", dict(threshold=math.inf)),
    "LLM.int8": ("int8", {}),
    "NF4": ("nf4", {}),
    "int4 g128": ("rtn4", {}),
    "int3 g128": ("rtn3", {}),
}
SNAPSHOT_METHODS = ("W8A8 per-row", "NF4", "int4 g128")  # quantized at every save of the bf16 / fp16 variants


def perplexity(model, held: torch.Tensor, seq: int, tokens: int) -> float:
    from lowbit.train.loop import heldout_perplexity

    with torch.no_grad():
        return heldout_perplexity(model, held, seq, tokens)


def degradations(model, held: torch.Tensor, seq: int, tokens: int, methods) -> dict:
    """{"fp": ppl, label: ppl_quantized / ppl - 1} for each method label."""
    from lowbit.app.methods import apply_method

    base = perplexity(model, held, seq, tokens)
    out = {"fp": base}
    for label in methods:
        name, overrides = METHODS[label]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = apply_method(copy.deepcopy(model).float().eval(), name, progress=False, **overrides)
        out[label] = perplexity(q, held, seq, tokens) / base - 1
    return out


def activations(model, held: torch.Tensor, seq: int, windows: int = 16) -> dict:
    """The largest |x| entering the hidden-width linear layers and the outlier features (`lowbit outliers`)."""
    from lowbit.analysis.outliers import find_outliers

    starts = torch.linspace(0, held.numel() - seq - 1, windows).long().tolist()
    with torch.no_grad():
        report = find_outliers(model.eval(), [held[s:s + seq].long().unsqueeze(0) for s in starts])
    s = report.summary()
    return {"max_abs": float(report.max_abs.max()), "outlier_features": s["outlier_features"],
            "dims_reaching_6": s["dims_reaching_threshold"], "width": s["width"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=ROOT / "corpus", help="built by scripts/build_corpus.py")
    p.add_argument("--size", default="micro")
    p.add_argument("--tokens-per-param", type=float, default=20.0)
    p.add_argument("--lr", type=float, default=1.6e-2, help="peak learning rate (the best fp32 rate of bench_bitnet at micro)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=131072, help="held-out tokens each score uses")
    p.add_argument("--snapshots", type=int, default=8, help="saves (and snapshot scores) per bf16 / fp16 run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train-choices-runs")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()

    import lowbit
    from lowbit.eval.speed import machine
    from lowbit.train import corpus
    from lowbit.train.model import build_model, non_embedding_params
    from lowbit.train.pretrain import TrainConfig, run

    tokens = corpus.load(args.corpus)
    tok, _, held = tokens
    n = non_embedding_params(build_model(args.size, len(tok), args.seq, tok.bos_token_id, tok.eos_token_id))
    steps = max(1, round(args.tokens_per_param * n / (args.batch * args.seq)))
    print(f"{machine()}\n{args.size}: {n:,} non-embedding parameters, {steps} steps of {args.batch} x {args.seq} "
          f"tokens ({steps * args.batch * args.seq:,} tokens), lr {args.lr:g}, seed {args.seed}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.variants.split(","):
        settings = {**RECIPE, **VARIANTS[name]}
        cfg = TrainConfig(size=args.size, bits="32", lr=args.lr, steps=steps, batch=args.batch, seq=args.seq,
                          vocab=len(tok), compile=True, eval_every=max(1, steps // 20), eval_tokens=65536,
                          save_every=max(1, steps // args.snapshots), seed=args.seed, **settings)
        folder = args.out / name
        done = folder / "study.json"
        if done.is_file():
            results[name] = json.loads(done.read_text())
            print(f"{name}: read back from {done}", flush=True)
            continue
        snaps = []

        def snapshot(step, saved, snaps=snaps, name=name):
            if name in ("baseline", "fp16"):  # bf16 against fp16, the rest of the recipe alike
                snaps.append({"step": step, **degradations(saved, held, args.seq, args.eval_tokens // 4,
                                                           SNAPSHOT_METHODS)})

        t = time.perf_counter()
        summary = run(None, folder, cfg, tokens=tokens, progress=args.progress, on_save=snapshot)
        model = lowbit.load(folder).float().eval()
        r = {"settings": {k: v for k, v in settings.items()}, "heldout_ppl": summary["heldout_ppl"],
             "train_seconds": summary["train_seconds"], "snapshots": snaps,
             "degradation": degradations(model, held, args.seq, args.eval_tokens, METHODS),
             "activations": activations(model, held, args.seq)}
        done.write_text(json.dumps(r, indent=1))
        results[name] = r
        print(f"{name}: held-out ppl {r['heldout_ppl']:.2f}, {time.perf_counter() - t:.0f} s; "
              + ", ".join(f"{k} {v:+.2%}" for k, v in r["degradation"].items() if k != "fp")
              + f"; max |x| {r['activations']['max_abs']:.1f}, outlier features {r['activations']['outlier_features']}",
              flush=True)

    (ROOT / "benchmarks" / "results" / "train_choices.json").write_text(json.dumps(
        {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "steps": steps,
         "non_embedding_params": n, "variants": results}, indent=1))
    print("\n| variant | wd | dropout | clip | precision | fp ppl | " + " | ".join(METHODS) +
          " | max abs(x) | dims reaching 6 | outlier features |")
    print("|---|---|---|---|---|---|" + "---|" * (len(METHODS) + 3))
    for name, r in results.items():
        s, d, a = r["settings"], r["degradation"], r["activations"]
        print(f"| {name} | {s['weight_decay']:g} | {s['dropout']:g} | {s['clip'] or 'off'} | {s['precision']} | "
              f"{d['fp']:.2f} | " + " | ".join(f"{d[k]:+.2%}" for k in METHODS) +
              f" | {a['max_abs']:.1f} | {a['dims_reaching_6']} / {a['width']} | {a['outlier_features']} |")
    plot_snapshots(results, ROOT / "docs" / "img" / "train_choices_steps.png")


def plot_snapshots(results: dict, path: Path) -> None:
    """Degradation against training step, bf16 (the baseline) against fp16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SNAPSHOT_METHODS), figsize=(5 * len(SNAPSHOT_METHODS), 4))
    for ax, label in zip(axes, SNAPSHOT_METHODS):
        for name, style in (("baseline", "o-"), ("fp16", "s--")):
            snaps = results.get(name, {}).get("snapshots", [])
            if snaps:
                ax.plot([s["step"] for s in snaps], [100 * s[label] for s in snaps], style, ms=3,
                        label=f"{results[name]['settings']['precision']} ({name})")
        ax.set(xlabel="training step", ylabel="perplexity degradation (%)", title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Post-training quantization of bf16- vs fp16-trained models along training")
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
