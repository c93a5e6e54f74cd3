"""BitNet b1.58 trained from scratch beside fp32 on the built corpus, each for a fixed number of tokens per parameter,
with a learning-rate sweep per size and variant and a width-scaled b1.58 (issue 36, item 3).

For each size: train fp32 (bf16 autocast compute, cosine schedule) and b1.58 (bf16 compute, two-stage schedule with
weight decay in the first stage only) at each learning rate of --lrs-fp / --lrs-b158, all on the same tokens (20 per
non-embedding parameter by default), seed and batches (`lowbit.train.pretrain.run`, what `lowbit train` runs); the
best rate of each by held-out perplexity is the row. Then a b1.58 model --width times as wide, at the best b1.58 rate
and the same tokens. Every model is scored on all held-out tokens of the corpus; the best fp32 model ternarized
after training (lowbit's `ternary` method) is the post-training row; the packed model's linear bytes and decode
speed are measured against the fp32 model.

Runs resume (a finished run's summary.json is read back), so a sweep can go size by size:
  python benchmarks/bench_bitnet.py --sizes micro --lrs-fp 2e-3,4e-3,8e-3 --lrs-b158 4e-3,8e-3,1.6e-2
  python benchmarks/bench_bitnet.py   (the defaults: micro and mini, the rates below; finished runs are read back)
Writes benchmarks/results/bitnet.json, docs/img/bitnet_curves.png and prints the tables. Single seed.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# BitNet b1.58 (Ma et al., 2024), Table 1: perplexity of LLaMA (fp16) and BitNet b1.58 trained alike.
PAPER = [("700M", 12.33, 12.87), ("1.3B", 11.25, 11.29), ("3B", 10.04, 9.91)]


def run_name(size: str, bits: str, lr: float, width: float) -> str:
    return f"{size}{'' if width == 1 else f'-w{width:g}'}-b{bits}-lr{lr:g}"


def train_one(args, tokens, size: str, bits: str, lr: float, width: float = 1.0) -> dict:
    """One run of `lowbit train`'s loop (read back when its summary is there with the same settings)."""
    from lowbit.train.model import build_model, non_embedding_params
    from lowbit.train.pretrain import TrainConfig, TrainError, run

    tok = tokens[0]
    n = non_embedding_params(build_model(size, len(tok), args.seq, tok.bos_token_id, tok.eos_token_id))
    steps = max(1, round(args.tokens_per_param * n / (args.batch * args.seq)))
    cfg = TrainConfig(size=size, width=width, bits=bits, lr=lr, steps=steps, batch=args.batch, seq=args.seq,
                      vocab=len(tok), precision="bf16", compile=True, eval_every=max(1, steps // 20),
                      eval_tokens=args.eval_tokens, save_every=max(1, steps // 4), seed=args.seed)
    folder = args.out / run_name(size, bits, lr, width)
    done = folder / "summary.json"
    if done.is_file() and json.loads(done.read_text())["config"] == asdict(cfg):
        return json.loads(done.read_text())
    t = time.perf_counter()
    try:
        s = run(None, folder, cfg, tokens=tokens, progress=args.progress)
    except TrainError as e:  # a rate too high for the size: the sweep's answer, not the benchmark's end
        print(f"{folder.name}: {e}", flush=True)
        return {"heldout_ppl": math.inf, "diverged": str(e), "config": asdict(cfg)}
    print(f"{folder.name}: held-out ppl {s['heldout_ppl']:.3f} after {s['tokens_seen']:,} tokens "
          f"({s['tokens_seen'] / s['train_seconds']:.0f} tok/s, {time.perf_counter() - t:.0f} s)", flush=True)
    return s


def unigram_ppl(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    """Held-out perplexity of token frequencies counted on the training tokens (add-one): what a model that ignores
    context scores, the floor every trained model here must beat."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    return math.exp(-float((counts / counts.sum()).log()[held].mean()))


def bigram_ppl(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    """Held-out perplexity of bigram counts of the training tokens, interpolated half and half with the add-one
    unigram: a one-token-context reference a trained model should pass."""
    pairs = torch.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).double().view(vocab, vocab)
    uni = torch.bincount(train, minlength=vocab).double() + 1
    p_bi = pairs[held[:-1], held[1:]] / pairs.sum(1).clamp(min=1)[held[:-1]]
    p = 0.5 * p_bi + 0.5 * (uni / uni.sum())[held[1:]]
    return math.exp(-float(p.log().mean()))


def ptq_ternary_ppl(folder: Path, held: torch.Tensor, seq: int) -> float:
    """Held-out perplexity of the trained fp32 model with its linear layers ternarized after training."""
    import warnings

    import lowbit
    from lowbit.train.loop import heldout_perplexity
    from lowbit.app.methods import apply_method

    model = lowbit.load(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ternary weights made post-training": that is the point here
        apply_method(model, "ternary", progress=False)
    return heldout_perplexity(model, held, seq, held.numel())


def packed_figures(fp_folder: Path, bit_folder: Path, repeats: int) -> dict:
    """Linear-layer bytes (packed vs fp16) and decode speed (packed vs fp32), both models as lowbit.load gives them."""
    import lowbit
    from lowbit.eval.speed import speed
    from lowbit.nn import BitLinear

    packed, fp = lowbit.load(bit_folder).eval(), lowbit.load(fp_folder).eval()
    layers = [m for m in packed.modules() if isinstance(m, BitLinear)]
    n = sum(m.in_features * m.out_features for m in layers)
    bits = sum(m.stored_bits() for m in layers)
    s_packed, s_fp = speed(packed, 128, 32, repeats), speed(fp, 128, 32, repeats)
    return {"linear_params": n, "packed_bytes": bits / 8, "fp16_bytes": 2 * n, "bits_per_param": bits / n,
            "decode_packed": s_packed["decode_tok_s"], "decode_fp32": s_fp["decode_tok_s"],
            "prefill_packed": s_packed["prefill_tok_s"], "prefill_fp32": s_fp["prefill_tok_s"]}


def ratio_curve(fp: dict, b: dict) -> list[tuple[float, float]]:
    """(tokens, b1.58 / fp32 held-out perplexity) at the evaluations both runs made."""
    fp_at = {e["tokens"]: e["ppl"] for e in fp["evals"]}
    return [(e["tokens"], e["ppl"] / fp_at[e["tokens"]]) for e in b["evals"] if e["tokens"] in fp_at]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl, ax_ratio) = plt.subplots(1, 3, figsize=(17, 4.5))
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for row, color in zip(rows, colors):
        for key, style, label in (("fp", "-", "fp32"), ("b158", "--", "b1.58"), ("wide", ":", f"b1.58 x{row['width']:g} wide")):
            s = row["runs"].get(key)
            if s is None:
                continue
            ax_ppl.plot([e["tokens"] / 1e6 for e in s["evals"]], [e["ppl"] for e in s["evals"]], style, color=color,
                        label=f"{row['size']} {label} (lr {s['config']['lr']:g})")
            losses = torch.tensor(s["losses"])
            k = max(1, len(losses) // 50)  # a running mean of 2% of the steps
            smooth = losses.unfold(0, k, 1).mean(1)
            per_step = s["tokens_seen"] / max(1, s["step"])
            ax_loss.plot([(i + k) * per_step / 1e6 for i in range(len(smooth))], smooth.tolist(), style, color=color,
                         label=f"{row['size']} {label}")
            if key != "fp":
                curve = ratio_curve(row["runs"]["fp"], s)
                ax_ratio.plot([t / 1e6 for t, _ in curve], [r for _, r in curve], style, color=color,
                              label=f"{row['size']} {label}")
    ax_loss.set(xlabel="training tokens (millions)", ylabel="training loss (running mean of 2% of the steps)",
                title="training loss", ylim=(2.5, 6.5))
    ax_ppl.set(xlabel="training tokens (millions)", ylabel="held-out perplexity (evaluation sample)", yscale="log",
               title="held-out perplexity while training")
    ax_ratio.axhline(1.15, color="grey", lw=0.8, ls="-.", label="target 1.15")
    ax_ratio.set(xlabel="training tokens (millions)", ylabel="b1.58 / fp32 held-out perplexity",
                 title="ternary's cost against tokens")
    for ax in (ax_loss, ax_ppl, ax_ratio):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("BitNet b1.58 vs fp32 from scratch on the corpus, best learning rate of each (single seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rates(text: str, size: str) -> list[float]:
    """The values (learning rates, token counts) of ``size`` in "2e-3,4e-3" (every size) or
    "micro=2e-3,4e-3;mini=4e-3" (per size)."""
    if "=" not in text:
        return [float(x) for x in text.split(",") if x]
    per_size = dict(part.split("=", 1) for part in text.split(";") if part)
    if size not in per_size:
        raise SystemExit(f"no values for {size} in {text!r}")
    return [float(x) for x in per_size[size].split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=ROOT / "corpus", help="built by scripts/build_corpus.py")
    p.add_argument("--sizes", default="micro,mini", help="sizes to run ('tiny' adds about 70 minutes here)")
    p.add_argument("--tokens-per-param", type=float, default=20.0, help="training tokens per non-embedding parameter")
    p.add_argument("--lrs-fp", default="micro=2e-3,4e-3,8e-3,1.6e-2,3.2e-2;mini=8e-3,1.6e-2;tiny=8e-3",
                   help="fp32 learning rates swept: 'LR,LR' for every size or 'SIZE=LR,LR;SIZE=LR'")
    p.add_argument("--lrs-b158", default="micro=4e-3,8e-3,1.6e-2,3.2e-2;mini=8e-3,1.6e-2;tiny=1.6e-2",
                   help="b1.58 learning rates swept, as --lrs-fp")
    p.add_argument("--width", default="micro=2;mini=0;tiny=0", help="the wide b1.58 model's width, '2' for every size or "
                   "'SIZE=2;SIZE=0' (0: none)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per evaluation while training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="speed runs (median)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bitnet-runs")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from lowbit.eval.speed import machine
    from lowbit.train import corpus

    tokens = corpus.load(args.corpus)
    tok, train_ids, held = tokens
    train_long, held_long = train_ids.long(), held.long()
    unigram, bigram = unigram_ppl(train_long, held_long, len(tok)), bigram_ppl(train_long, held_long, len(tok))
    print(f"{machine()}\ncorpus {args.corpus}: {len(tok)} tokenizer entries; {train_ids.numel():,} training tokens, "
          f"{held.numel():,} held out; held-out perplexity of unigram counts {unigram:.1f}, of interpolated bigram "
          f"counts {bigram:.1f}", flush=True)

    rows = []
    for size in args.sizes.split(","):
        fp = {lr: train_one(args, tokens, size, "32", lr) for lr in rates(args.lrs_fp, size)}
        b = {lr: train_one(args, tokens, size, "1.58", lr) for lr in rates(args.lrs_b158, size)}
        best_fp = min(fp, key=lambda lr: fp[lr]["heldout_ppl"])
        best_b = min(b, key=lambda lr: b[lr]["heldout_ppl"])
        runs = {"fp": fp[best_fp], "b158": b[best_b]}
        width = (rates(args.width, size) or [0.0])[0]
        if width:
            runs["wide"] = train_one(args, tokens, size, "1.58", best_b, width)
        f, t = runs["fp"], runs["b158"]
        fp_dir, b_dir = args.out / run_name(size, "32", best_fp, 1), args.out / run_name(size, "1.58", best_b, 1)
        row = {"size": size, "width": width, "non_embedding_params": f["non_embedding_params"],
               "params": f["params"], "tokens": f["tokens_seen"],
               "tokens_per_param": f["tokens_seen"] / f["non_embedding_params"],
               "epochs": f["tokens_seen"] / train_ids.numel(),
               "sweep_fp": {lr: s["heldout_ppl"] for lr, s in fp.items()},
               "sweep_b158": {lr: s["heldout_ppl"] for lr, s in b.items()},
               "fp_ppl": f["heldout_ppl"], "b158_ppl": t["heldout_ppl"], "b158_packed_ppl": t["heldout_ppl_saved"],
               "ratio": t["heldout_ppl"] / f["heldout_ppl"],
               "fp_tok_s_train": f["tokens_seen"] / f["train_seconds"],
               "b158_tok_s_train": t["tokens_seen"] / t["train_seconds"],
               "ptq_ternary_ppl": ptq_ternary_ppl(fp_dir, held_long, args.seq), "runs": runs}
        if "wide" in runs:
            row.update(wide_params=runs["wide"]["non_embedding_params"], wide_ppl=runs["wide"]["heldout_ppl"],
                       wide_ratio=runs["wide"]["heldout_ppl"] / f["heldout_ppl"])
        row.update(packed_figures(fp_dir, b_dir, args.repeats))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)

    (ROOT / "docs" / "img").mkdir(exist_ok=True)
    plot(rows, ROOT / "docs" / "img" / "bitnet_curves.png")
    for row in rows:
        row["runs"] = {k: {"evals": s["evals"], "lr": s["config"]["lr"]} for k, s in row["runs"].items()}
    result = {"machine": machine(), "unigram_ppl": unigram, "bigram_ppl": bigram,
              "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "paper": [{"size": s, "fp16_ppl": f, "b158_ppl": b, "ratio": b / f} for s, f, b in PAPER]}
    (ROOT / "benchmarks" / "results" / "bitnet.json").write_text(json.dumps(result, indent=1))

    print("\nlearning-rate sweeps, held-out perplexity:")
    for r in rows:
        print(f"  {r['size']}: fp32 " + ", ".join(f"{lr:g}: {v:.2f}" for lr, v in r["sweep_fp"].items())
              + "; b1.58 " + ", ".join(f"{lr:g}: {v:.2f}" for lr, v in r["sweep_b158"].items()))
    print("\n| size | non-emb params | tokens (per param, epochs) | fp32 ppl | b1.58 ppl | ratio | b1.58 wide (params) "
          "ratio | b1.58 packed ppl | ternary PTQ of fp32 ppl | linear bytes packed / fp16 (bits/param) | "
          "decode tok/s packed / fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        wide = f"{r['wide_ppl']:.2f} ({r['wide_params'] / 1e6:.2f}M) {r['wide_ratio']:.3f}" if "wide_ppl" in r else "-"
        print(f"| {r['size']} | {r['non_embedding_params'] / 1e6:.2f}M | {r['tokens'] / 1e6:.2f}M "
              f"({r['tokens_per_param']:.1f}, {r['epochs']:.2f}) | {r['fp_ppl']:.2f} | {r['b158_ppl']:.2f} | "
              f"{r['ratio']:.3f} | {wide} | {r['b158_packed_ppl']:.2f} | {r['ptq_ternary_ppl']:.4g} | "
              f"{r['packed_bytes'] / 1e6:.3f} MB / {r['fp16_bytes'] / 1e6:.3f} MB ({r['bits_per_param']:.3f}) | "
              f"{r['decode_packed']:.1f} / {r['decode_fp32']:.1f} |")
    print("\npaper (Ma et al. 2024, Table 1): " + ", ".join(f"{s}: {b / f:.3f}" for s, f, b in PAPER))
    trend = [r["ratio"] for r in rows]
    print(f"ratio by size here: {', '.join(f'{r:.3f}' for r in trend)}; falls with size: "
          f"{all(a > b for a, b in zip(trend, trend[1:]))}; largest size within 1.15x: {trend[-1] <= 1.15}; "
          f"ternary PTQ worse than trained b1.58 at every size: "
          f"{all(r['ptq_ternary_ppl'] > r['b158_ppl'] for r in rows)}")


if __name__ == "__main__":
    main()
