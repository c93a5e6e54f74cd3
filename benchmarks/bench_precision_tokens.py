"""Post-training quantization against training tokens (Kumar et al., "Scaling laws for precision", 2024), reproduced
small: Study B of issue 37.

For each size, one fp32 model (bf16 autocast, cosine schedule to its own end) per token count of --tokens, on the
built corpus with the same seed and batches; each is quantized to 8, 4 and 3 bits, round-to-nearest (groups of 128)
and GPTQ (groups of 128, calibrated on training windows), and scored on the held-out tokens. The degradation is the
held-out loss difference delta = ln ppl_quantized - ln ppl (nats), the paper's delta_PTQ. Its form,

    delta = C * D^a / N^b * exp(-P / g)        (D tokens, N non-embedding parameters, P bits)

is fitted separately for RTN and GPTQ by `lowbit.analysis.ptq_law.fit_ptq_law` (least squares of ln delta on the
points with delta > 0, bootstrap intervals, residuals shown).

Writes benchmarks/results/precision_tokens.json and docs/img/precision_tokens.png; runs resume. Single seed.
Usage: python benchmarks/bench_precision_tokens.py [--sizes micro,mini] [--tokens "micro=0.5e6,...,16e6;mini=1e6,4e6,16e6"]
       [--lr "micro=1.6e-2;mini=8e-3"]   (the best fp32 rates of bench_bitnet.py's sweeps)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import warnings
from pathlib import Path

import torch
from bench_bitnet import rates  # the per-size option syntax "micro=8e-3;mini=4e-3" (benchmarks run as scripts)

ROOT = Path(__file__).resolve().parent.parent
BITS = (8, 4, 3)
QUANTIZERS = ("rtn", "gptq")


def scores(model, held: torch.Tensor, calib: torch.Tensor, seq: int, tokens: int) -> dict:
    """{"ppl": fp perplexity, "rtn8": delta, ..., "gptq3": delta} on ``tokens`` held-out tokens."""
    from lowbit.app.methods import apply_method
    from lowbit.train.loop import heldout_perplexity

    with torch.no_grad():
        base = heldout_perplexity(model, held, seq, tokens)
    out = {"ppl": base}
    for quantizer in QUANTIZERS:
        for bits in BITS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = apply_method(copy.deepcopy(model).eval(), f"{quantizer}{bits}", progress=False,
                                 calibration=calib if quantizer == "gptq" else None)
            with torch.no_grad():
                out[f"{quantizer}{bits}"] = math.log(heldout_perplexity(q, held, seq, tokens)) - math.log(base)
    return out


def plot(points: list[dict], fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    sizes = sorted({p["size"] for p in points}, key=lambda s: min(p["params"] for p in points if p["size"] == s))
    markers = dict(zip(sizes, "os^D"))
    colors = {8: "tab:green", 4: "tab:blue", 3: "tab:red"}
    for ax, quantizer in zip(axes[:2], QUANTIZERS):
        for size in sizes:
            for bits in BITS:
                pts = [p for p in points if p["size"] == size and p["bits"] == bits]
                ax.plot([p["tokens"] / p["params"] for p in pts], [max(p[quantizer], 1e-5) for p in pts],
                        markers[size] + "-", color=colors[bits], ms=4, label=f"{size}, {bits} bits")
        ax.set(xscale="log", yscale="log", xlabel="training tokens per parameter",
               ylabel="delta = ln ppl(quantized) - ln ppl (nats)", title=f"{quantizer.upper()} after training")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for quantizer, style in zip(QUANTIZERS, ("o", "s")):
        f = fits.get(quantizer, {})
        res = f.get("residuals", [])
        axes[2].plot([r["tokens"] / r["params"] for r in res], [r["residual"] for r in res], style, ms=4,
                     label=f"{quantizer.upper()} (rms {f.get('rms_residual', float('nan')):.2f})")
    axes[2].axhline(0, color="grey", lw=0.8)
    axes[2].set(xscale="log", xlabel="training tokens per parameter", ylabel="residual of ln delta",
                title="fit residuals")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=ROOT / "corpus", help="built by scripts/build_corpus.py")
    p.add_argument("--sizes", default="micro,mini")
    p.add_argument("--tokens", default="micro=0.5e6,1e6,2e6,4e6,8e6,16e6;mini=1e6,4e6,16e6",
                   help="training tokens of each run: 'T,T' for every size or 'SIZE=T,T;SIZE=T'")
    p.add_argument("--lr", default="micro=1.6e-2;mini=8e-3", help="peak learning rate, '8e-3' or per size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens each score uses (the same for all)")
    p.add_argument("--calibration", type=int, default=64, help="GPTQ calibration windows of --seq training tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision-tokens-runs")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()

    import lowbit
    from lowbit.analysis.ptq_law import Point, fit_ptq_law
    from lowbit.eval.speed import machine
    from lowbit.train import corpus
    from lowbit.train.pretrain import TrainConfig, run

    tokens = corpus.load(args.corpus)
    tok, train_ids, held = tokens
    last = train_ids.numel() - args.seq - 1  # integer steps: float32 linspace rounds past the end of 59M tokens
    starts = [i * last // max(1, args.calibration - 1) for i in range(args.calibration)]
    calib = torch.stack([train_ids[s:s + args.seq].long() for s in starts])
    print(machine(), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    points = []
    for size in args.sizes.split(","):
        for count in rates(args.tokens, size):
            steps = max(1, round(count / (args.batch * args.seq)))
            cfg = TrainConfig(size=size, bits="32", precision="bf16", compile=True, lr=rates(args.lr, size)[0],
                              steps=steps, batch=args.batch, seq=args.seq, vocab=len(tok), seed=args.seed,
                              eval_every=steps, save_every=steps)
            folder = args.out / f"{size}-{steps * args.batch * args.seq}"
            done = folder / "study.json"
            if done.is_file():
                r = json.loads(done.read_text())
            else:
                s = run(None, folder, cfg, tokens=tokens, progress=args.progress)
                model = lowbit.load(folder).float().eval()
                r = {"size": size, "params": s["non_embedding_params"], "tokens": s["tokens_seen"], "lr": cfg.lr,
                     **scores(model, held, calib, args.seq, args.eval_tokens)}
                done.write_text(json.dumps(r, indent=1))
            for bits in BITS:
                points.append({"size": size, "params": r["params"], "tokens": r["tokens"], "bits": bits,
                               "ppl": r["ppl"], **{q: r[f"{q}{bits}"] for q in QUANTIZERS}})
            print(f"{size} {r['tokens'] / 1e6:.2f}M tokens ({r['tokens'] / r['params']:.1f}/param): ppl {r['ppl']:.2f}; "
                  + ", ".join(f"{q}{b} {r[f'{q}{b}']:+.4f}" for q in QUANTIZERS for b in BITS), flush=True)

    fits = {}
    for q in QUANTIZERS:
        try:
            fits[q] = fit_ptq_law([Point(p["tokens"], p["params"], p["bits"], p[q]) for p in points])
        except ValueError as e:
            fits[q] = {"error": str(e)}
    (ROOT / "benchmarks" / "results" / "precision_tokens.json").write_text(json.dumps(
        {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "points": points, "fits": fits},
        indent=1))
    print("\n| size | tokens | tokens/param | fp ppl | " + " | ".join(f"{q.upper()} {b}" for q in QUANTIZERS for b in BITS)
          + " |")
    print("|---|---|---|---|" + "---|" * (len(QUANTIZERS) * len(BITS)))
    for size in dict.fromkeys(p["size"] for p in points):
        for count in dict.fromkeys(p["tokens"] for p in points if p["size"] == size):
            row = {p["bits"]: p for p in points if p["size"] == size and p["tokens"] == count}
            first = row[BITS[0]]
            print(f"| {size} | {count / 1e6:.2f}M | {count / first['params']:.1f} | {first['ppl']:.2f} | "
                  + " | ".join(f"{row[b][q]:+.4f}" for q in QUANTIZERS for b in BITS) + " |")
    print("\nfit of ln delta = ln C + a ln D - b ln N - P/g (95% bootstrap intervals):")
    for q, f in fits.items():
        if "error" in f:
            print(f"  {q}: {f['error']}")
            continue
        ci = f["ci95"]
        b_text = f"b = {f['b']:.3f} [{ci['b'][0]:.3f}, {ci['b'][1]:.3f}]" if "b" in f else "b not identified (one size)"
        print(f"  {q.upper()}: a = {f['a']:.3f} [{ci['a'][0]:.3f}, {ci['a'][1]:.3f}], {b_text}, g = {f['g']:.3f} "
              f"(1/g [{ci['inv_g'][0]:.3f}, {ci['inv_g'][1]:.3f}]), ln C = {f['lnC']:.2f}; {f['points']} points ({f['excluded']} with delta <= 0 "
              f"left out), rms residual {f['rms_residual']:.3f}")
    plot(points, fits, ROOT / "docs" / "img" / "precision_tokens.png")


if __name__ == "__main__":
    main()
