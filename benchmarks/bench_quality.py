"""Quality of each lowbit layer beside bitsandbytes' layers: SmolLM2-135M perplexity, then LLM.int8 on every
architecture tried and on the MiniLM encoder's embeddings.

Protocol (as ../shared/models.md): first 8192 tokens of each text, non-overlapping 512-token windows, loss over every
predicted token, fp32 compute. Each row also gives the KL divergence from the fp32 model's next-token distribution
(mean per token, nats): unlike a perplexity ratio, which quantization noise can move either way, it only grows with
the error. LLM.int8 across architectures: random-config models with planted outlier features
(lowbit.app.synthetic, 4 blocks of width 256, seed 0) on the first 2048 tokens of each text; a random model
predicts text no better than chance, so its perplexity ratio is noise around 1 and its KL is the measure.
MiniLM: all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normed) of 512 wikipedia-sample lines, 1 - cosine to
fp32, mean and worst.

Usage: python benchmarks/bench_quality.py [--tokens 8192] [--arch-tokens 2048] [--no-bnb] [--int8-only]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

import lowbit
from lowbit.app.models import load_any, load_default_model
from lowbit.app.synthetic import ARCHITECTURES, outlier_model
from lowbit.eval import memory_report

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TEXTS = {"python-tutorial": SHARED / "python-tutorial.txt", "wikipedia-sample": SHARED / "wikipedia-sample.txt"}
INT8 = {
    "lowbit LLM.int8 (default: zero-point activations)": lambda m: lowbit.quantize(m, lowbit.Int8Config(), progress=False),
    "lowbit LLM.int8, absmax activations": lambda m: lowbit.quantize(
        m, lowbit.Int8Config(activations="absmax"), progress=False),
}
BNB_INT8 = "bitsandbytes Linear8bitLt 6.0 (eval)"


@torch.no_grad()
def score(model, windows: list[torch.Tensor], reference: list[torch.Tensor] | None = None):
    """(perplexity, mean KL from ``reference``'s log-probs or None, the log-probs per window) over ``windows``."""
    nll, kl, count, logprobs = 0.0, 0.0, 0, []
    for i, chunk in enumerate(windows):
        lp = model(chunk.unsqueeze(0)).logits[0, :-1].float().log_softmax(-1)
        nll -= float(lp.gather(1, chunk[1:, None]).sum())
        count += chunk.numel() - 1
        if reference is not None:
            ref = reference[i]
            kl += float((ref.exp() * (ref - lp)).sum())
        logprobs.append(lp.to(torch.bfloat16))  # the reference of later rows: half the memory, 3 digits of KL
    return math.exp(nll / count), (kl / count if reference is not None else None), logprobs


def windows_of(tok, text: str, tokens: int, window: int = 512) -> list[torch.Tensor]:
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0][:tokens]
    return [ids[s:s + window] for s in range(0, ids.numel() - 1, window) if ids[s:s + window].numel() > 1]


def run_rows(model, variants: dict, texts: dict[str, list[torch.Tensor]], label: str) -> list[dict]:
    """One row per variant (the first is the fp32 reference): perplexity, ratio and KL on each text."""
    rows, refs = [], {}
    for name, make in variants.items():
        m = make(copy.deepcopy(model))
        row = {"model": label, "method": name}
        for tname, wins in texts.items():
            ref = None if name == "fp32" else [r.float() for r in refs[tname]]
            ppl, kl, lps = score(m, wins, ref)
            if name == "fp32":
                refs[tname] = lps
            row[tname] = {"ppl": ppl, "ratio": ppl / rows[0][tname]["ppl"] if rows else 1.0, "kl": kl or 0.0}
        rows.append(row)
        print(f"{label:8} {name:52} " + "  ".join(
            f"{t}: {row[t]['ppl']:10.3f} ({row[t]['ratio']:.4f}x, KL {row[t]['kl']:.2e})" for t in texts), flush=True)
    return rows


def minilm_rows(bnb: bool) -> list[dict]:
    """1 - cosine of all-MiniLM-L6-v2 sentence embeddings to fp32's, for LLM.int8 in lowbit and bitsandbytes."""
    model, tok = load_any("all-minilm-l6-v2")
    lines = [ln.strip() for ln in TEXTS["wikipedia-sample"].read_text().splitlines() if len(ln.strip()) > 40][:512]

    @torch.no_grad()
    def embed(m) -> torch.Tensor:
        out = []
        for i in range(0, len(lines), 64):
            enc = tok(lines[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = m(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    ref = embed(model)
    # the encoder's block linears (the pooler is unused by sentence embeddings): the same layers in both libraries
    variants = {name: (lambda m, a=a: lowbit.quantize(m, lowbit.Int8Config(activations=a, skip=("pooler.*",)),
                                                      progress=False))
                for name, a in zip(INT8, ("zeropoint", "absmax"))}
    if bnb:
        from lowbit.app.peers import bnb_swap
        variants[BNB_INT8] = lambda m: bnb_swap(m, "int8", blocks=("encoder.layer.",))
    rows = []
    for name, make in variants.items():
        dist = 1 - (embed(make(copy.deepcopy(model))) * ref).sum(-1)
        rows.append({"model": "minilm", "method": name, "1-cos mean": float(dist.mean()), "1-cos max": float(dist.max())})
        print(f"minilm   {name:52} 1 - cos: mean {dist.mean():.3e}, worst {dist.max():.3e}", flush=True)
    return rows


def check_int8(rows: list[dict], texts) -> list[tuple[str, bool]]:
    """Whether lowbit's default LLM.int8 is no worse than bitsandbytes' on each model and text (ratio and KL; None:
    not a criterion)."""
    by = {(r["model"], r["method"]): r for r in rows}
    checks = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ours, theirs = by.get((model, next(iter(INT8)))), by.get((model, BNB_INT8))
        if ours is None or theirs is None:
            continue
        if model == "minilm":
            checks.append((f"minilm: lowbit 1-cos {ours['1-cos mean']:.3e} <= bitsandbytes {theirs['1-cos mean']:.3e}",
                           ours["1-cos mean"] <= theirs["1-cos mean"]))
            continue
        for t in texts:
            a, b = ours[t], theirs[t]
            # A random model's perplexity ratio is noise around 1 (bitsandbytes' own reaches 0.9988): shown, not judged.
            checks.append((f"{model} / {t}: lowbit ratio {a['ratio']:.4f} <= bitsandbytes {b['ratio']:.4f}",
                           None if model in ARCHITECTURES else a["ratio"] <= b["ratio"]))
            checks.append((f"{model} / {t}: lowbit KL {a['kl']:.3e} <= bitsandbytes {b['kl']:.3e}", a["kl"] <= b["kl"]))
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--arch-tokens", type=int, default=2048)
    ap.add_argument("--archs", default=",".join(ARCHITECTURES))
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--int8-only", action="store_true", help="only the LLM.int8 rows (and fp32)")
    ap.add_argument("--extra-text", action="append", default=[], type=Path,
                    help="another text file to score SmolLM2 on (repeatable; e.g. the Python docs' sources of "
                         "apt-get install python3.11-doc, /usr/share/doc/python3.11/html/_sources/...)")
    ap.add_argument("--bf16-model", action="store_true",
                    help="cast SmolLM2 to bfloat16 before each method (the fp32 model stays the reference)")
    args = ap.parse_args()
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    model, tok = load_default_model()
    paths = {**TEXTS, **{p.name.removesuffix(".txt"): p for p in args.extra_text}}
    texts = {t: windows_of(tok, p.read_text(), args.tokens) for t, p in paths.items()}
    variants = {"fp32": lambda m: m, **INT8}
    if not args.int8_only:
        variants.update({
            "lowbit int8 weight-only": lambda m: lowbit.quantize(m, lowbit.Int8Config(weight_only=True), progress=False),
            "lowbit nf4 bs64": lambda m: lowbit.quantize(m, lowbit.NF4Config(double_quant=False), progress=False),
            "lowbit nf4 bs64 + double quant": lambda m: lowbit.quantize(m, lowbit.NF4Config(), progress=False),
            "lowbit fp4 bs64 + double quant": lambda m: lowbit.quantize(m, lowbit.NF4Config(quant_type="fp4"), progress=False),
            "lowbit int4 group 64": lambda m: lowbit.quantize(m, lowbit.NF4Config(quant_type="int4"), progress=False),
            "lowbit ternary (PTQ, b1.58 needs training)": lambda m: lowbit.quantize(m, lowbit.TernaryConfig(), progress=False),
        })
    if not args.no_bnb:
        from lowbit.app.peers import bnb_swap

        variants[BNB_INT8] = lambda m: bnb_swap(m, "int8")
        if not args.int8_only:
            variants["bitsandbytes NF4 + DQ (eval)"] = lambda m: bnb_swap(m, "nf4")
            # In training mode bitsandbytes' CPU path dequantizes the weight and never quantizes activations.
            variants["bitsandbytes Linear8bitLt 6.0 (training mode)"] = lambda m: bnb_swap(m, "int8").train()
    if args.bf16_model:  # a model loaded in bf16 (transformers' dtype="auto" for bf16 checkpoints), then quantized
        variants = {name: f if name == "fp32" else (lambda m, f=f: f(m.to(torch.bfloat16)))
                    for name, f in {"fp32": variants.pop("fp32"), "bf16": lambda m: m, **variants}.items()}
    rows = run_rows(model, variants, texts, "smollm2-bf16" if args.bf16_model else "smollm2")
    for row in rows:
        if row["method"].startswith("lowbit"):
            m = variants[row["method"]](copy.deepcopy(model))
            row["bits_per_param"] = memory_report(m)["bits_per_param"]
    int8_variants = {"fp32": lambda m: m, **INT8}
    if not args.no_bnb:
        int8_variants[BNB_INT8] = variants[BNB_INT8]
    arch_texts = {t: windows_of(tok, p.read_text(), args.arch_tokens) for t, p in TEXTS.items()}
    for arch in filter(None, args.archs.split(",")):
        rows += run_rows(outlier_model(arch), int8_variants, arch_texts, arch)
    rows += minilm_rows(not args.no_bnb)
    for what, ok in check_int8(rows, texts):
        print(f"{'noise ' if ok is None else 'met   ' if ok else 'MISSED'} {what}")
    out = Path(__file__).parent / "results" / "quality.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "tokens": args.tokens, "arch_tokens": args.arch_tokens,
                               "window": 512, "rows": rows}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
