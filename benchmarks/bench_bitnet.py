"""BitNet b1.58 trained from scratch beside fp32, at three sizes, on the Wikipedia sample (issue 16).

For each size (tiny, small, base: about 1M, 5M, 20M non-embedding parameters) train an fp32 and a b1.58 model with
the same tokenizer, data, token budget and seed (`lowbit.train.pretrain.run`, what `lowbit train` runs) on the first
90% of shared/data/wikipedia-sample.txt; score every model on all held-out tokens (the last 10%); ternarize each fp32
model after training (lowbit's `ternary` method) for the post-training comparison; measure the packed model's linear
weight bytes against fp16 and its greedy decode speed against the fp32 model.

Writes benchmarks/results/bitnet.json, docs/img/bitnet_curves.png and prints the table. Runs resume: a finished run
(its summary.json) is read back, an interrupted one continues from its checkpoint.
Usage: python benchmarks/bench_bitnet.py [--sizes tiny,small,base] [--tokens 819200] [--batch 8] [--seq 256]
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
DATA = ROOT.parent / "shared" / "data" / "wikipedia-sample.txt"
# BitNet b1.58 (Ma et al., 2024), Table 1: perplexity of LLaMA (fp16) and BitNet b1.58 trained alike.
PAPER = [("700M", 12.33, 12.87), ("1.3B", 11.25, 11.29), ("3B", 10.04, 9.91)]


def train_runs(args, text: str, tok, out: Path) -> dict:
    from lowbit.train.pretrain import TrainConfig, run

    steps = args.tokens // (args.batch * args.seq)
    runs = {}
    for size in args.sizes:
        for bits in ("32", "1.58"):
            cfg = TrainConfig(size=size, bits=bits, steps=steps, batch=args.batch, seq=args.seq, vocab=len(tok),
                              eval_every=max(1, steps // 10), save_every=max(1, steps // 4), seed=args.seed)
            folder = out / f"{size}-b{bits}"
            done = folder / "summary.json"
            if done.is_file() and json.loads(done.read_text())["config"] == asdict(cfg):
                runs[size, bits] = json.loads(done.read_text())
                print(f"{size} b{bits}: read back from {done}")
                continue
            t = time.perf_counter()
            runs[size, bits] = run(text, folder, cfg, tokenizer=tok, progress=args.progress)
            s = runs[size, bits]
            print(f"{size} b{bits}: held-out ppl {s['heldout_ppl']:.3f} after {s['tokens_seen']:,} tokens "
                  f"({s['tokens_seen'] / s['train_seconds']:.0f} tok/s, {time.perf_counter() - t:.0f} s)", flush=True)
    return runs


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


def plot(runs: dict, sizes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(sizes, ("tab:blue", "tab:orange", "tab:green")))
    for (size, bits), s in runs.items():
        style = "-" if bits == "32" else "--"
        label = f"{size} {'fp32' if bits == '32' else 'b1.58'}"
        losses = torch.tensor(s["losses"])
        k = max(1, len(losses) // 25)
        smooth = losses.unfold(0, k, 1).mean(1) if len(losses) >= k else losses
        per_step = s["tokens_seen"] / max(1, s["step"])
        ax_loss.plot([(i + k) * per_step / 1e6 for i in range(len(smooth))], smooth.tolist(), style,
                     color=colors[size], label=label)
        ax_ppl.plot([e["tokens"] / 1e6 for e in s["evals"]], [e["ppl"] for e in s["evals"]], style + "o",
                    color=colors[size], ms=3, label=label)
    ax_loss.set(xlabel="training tokens (millions)", ylabel=f"training loss (mean of {k} steps)",
                title="training loss")
    ax_ppl.set(xlabel="training tokens (millions)", ylabel="held-out perplexity", yscale="log",
               title="held-out perplexity (first 16k held-out tokens)")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("BitNet b1.58 (dashed) vs fp32 (solid), trained from scratch on the Wikipedia sample")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,small,base")
    p.add_argument("--tokens", type=int, default=819200, help="training tokens per run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="speed runs (median)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bitnet-runs")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args()
    args.sizes = args.sizes.split(",")

    from lowbit.eval.speed import machine
    from lowbit.train.pretrain import TrainConfig, prepare_data
    from lowbit.train.tokenizer import train_tokenizer
    from transformers import AutoTokenizer

    text = DATA.read_text(encoding="utf-8")
    args.out.mkdir(parents=True, exist_ok=True)
    tok_dir = args.out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:  # one tokenizer for every run, trained on the training part only
        from lowbit.train.pretrain import split_text

        tok = train_tokenizer(split_text(text, 0.1)[0], args.vocab)
        tok.save_pretrained(tok_dir)
    _, train_ids, held = prepare_data(text, TrainConfig(seq=args.seq), tok)
    unigram, bigram = unigram_ppl(train_ids, held, len(tok)), bigram_ppl(train_ids, held, len(tok))
    print(f"{machine()}\ntokenizer: {len(tok)} entries; {train_ids.numel():,} training tokens, {held.numel():,} held out; "
          f"held-out perplexity of unigram counts {unigram:.1f}, of interpolated bigram counts {bigram:.1f}", flush=True)

    runs = train_runs(args, text, tok, args.out)
    rows = []
    for size in args.sizes:
        fp, b = runs[size, "32"], runs[size, "1.58"]
        row = {"size": size, "non_embedding_params": fp["non_embedding_params"], "params": fp["params"],
               "tokens": fp["tokens_seen"], "epochs": fp["tokens_seen"] / train_ids.numel(),
               "fp_ppl": fp["heldout_ppl"], "b158_ppl": b["heldout_ppl"], "b158_packed_ppl": b["heldout_ppl_saved"],
               "packed_loss_rel_diff": b["saved_loss_rel_diff"],
               "fp_tok_s_train": fp["tokens_seen"] / fp["train_seconds"], "b158_tok_s_train": b["tokens_seen"] / b["train_seconds"],
               "ptq_ternary_ppl": ptq_ternary_ppl(args.out / f"{size}-b32", held, args.seq)}
        row["ratio"] = row["b158_ppl"] / row["fp_ppl"]
        row.update(packed_figures(args.out / f"{size}-b32", args.out / f"{size}-b1.58", args.repeats))
        rows.append(row)
        print(json.dumps(row), flush=True)

    (ROOT / "docs" / "img").mkdir(exist_ok=True)
    plot(runs, args.sizes, ROOT / "docs" / "img" / "bitnet_curves.png")
    result = {"machine": machine(), "unigram_ppl": unigram, "bigram_ppl": bigram, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "paper": [{"size": s, "fp16_ppl": f, "b158_ppl": b, "ratio": b / f} for s, f, b in PAPER]}
    (ROOT / "benchmarks" / "results" / "bitnet.json").write_text(json.dumps(result, indent=1))

    print("\n| size | non-emb params | tokens (epochs) | fp32 ppl | b1.58 ppl | ratio | b1.58 packed ppl | packed vs "
          "training loss | ternary PTQ of fp32 ppl | linear bytes packed / fp16 (bits/param) | decode tok/s packed / fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['non_embedding_params'] / 1e6:.2f}M | {r['tokens'] / 1e6:.2f}M ({r['epochs']:.2f}) | "
              f"{r['fp_ppl']:.2f} | {r['b158_ppl']:.2f} | {r['ratio']:.3f} | {r['b158_packed_ppl']:.2f} | "
              f"{r['packed_loss_rel_diff']:.1e} | {r['ptq_ternary_ppl']:.4g} | {r['packed_bytes'] / 1e6:.2f} MB / "
              f"{r['fp16_bytes'] / 1e6:.2f} MB ({r['bits_per_param']:.3f}) | {r['decode_packed']:.1f} / {r['decode_fp32']:.1f} |")
    print("\npaper (Ma et al. 2024, Table 1): " + ", ".join(f"{s}: {b / f:.3f}" for s, f, b in PAPER))
    trend = [r["ratio"] for r in rows]
    print(f"ratio by size here: {', '.join(f'{r:.3f}' for r in trend)}; improves with size: "
          f"{all(a > b for a, b in zip(trend, trend[1:]))}; largest size within 1.15x: {trend[-1] <= 1.15}")


if __name__ == "__main__":
    main()
