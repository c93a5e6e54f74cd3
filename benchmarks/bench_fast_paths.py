"""What lowbit's faster arithmetic costs in quality: SmolLM2-135M perplexity on both shared texts, exact path
against each fast path, per format (issue 34: a fast path is the default only at <= +0.5% perplexity).

Fast paths measured:
- bf16 prompt GEMMs (``lowbit.kernels.fast_prefill()``, the prompt of ``lowbit.generate`` on CPUs with native
  bf16): every quantized float32 layer multiplies its dequantized weight and the activations in bf16. Perplexity is
  computed with every window inside it, so each token's logits see the bf16 GEMMs in every layer: an upper bound
  of what the prompt's bf16 costs the tokens decoded after it.
- int8 activations in decode (the native step's default, ``LOWBIT_DECODE_ACTIVATIONS``): every token of each
  window goes through the native decode step one at a time, as generated tokens do, with float32 activations and
  with int8 ones; the two perplexities differ only by the int8 arithmetic (--decode-tokens of each text: stepping
  is slower than a windowed forward).

Protocol as bench_quality.py (first --tokens tokens of each text, non-overlapping 512-token windows, fp32 compute).
Usage: python benchmarks/bench_fast_paths.py [--tokens 8192] [--methods nf4+int8-emb,int8-weight+int8-emb,native-q4_1]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path

import torch

import lowbit
from lowbit.app.models import load_default_model, load_native
from lowbit.decode import StaticDecoder
from lowbit.eval.perplexity import perplexity
from lowbit.eval.speed import machine
from lowbit.kernels import fast_prefill

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TEXTS = {"python-tutorial": SHARED / "python-tutorial.txt", "wikipedia-sample": SHARED / "wikipedia-sample.txt"}


def build(method: str, base) -> torch.nn.Module:
    name, _, suffix = method.partition("+")
    if name == "native-q4_1":
        model, _ = load_native("smollm2-135m", progress=False)
    else:
        model = lowbit.quantize(copy.deepcopy(base), name, progress=False)
    if suffix == "int8-emb":
        lowbit.quantize_embeddings(model, "int8")
    return model.eval()


@torch.no_grad()
def decode_perplexity(model, tok, text: str, tokens: int, window: int = 512) -> float:
    """exp(mean NLL) of the first ``tokens`` tokens of ``text``, every token fed alone through the decode step (the
    native one where it runs the model), in non-overlapping windows of ``window`` tokens."""
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[:, :tokens]
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, window):
        chunk = ids[:, start:start + window]
        decoder = StaticDecoder(model, 1, chunk.shape[1])
        for i in range(chunk.shape[1] - 1):
            logits = decoder.forward(chunk[:, i:i + 1])
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[:, i + 1]))
            count += 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--methods", default="nf4+int8-emb,int8-weight+int8-emb,native-q4_1")
    ap.add_argument("--decode-tokens", type=int, default=4096)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    # The bf16 GEMMs run wherever asked here, also on a CPU that would not choose them (emulated: slower, same sums).
    os.environ["LOWBIT_PREFILL"] = "bf16"
    print(f"machine: {machine()}")
    base, tok = load_default_model()
    texts = {name: path.read_text() for name, path in TEXTS.items()}
    rows = []
    print(f"| format | text | exact ({args.tokens} tokens) | bf16 prompt GEMMs | cost | decode step, float32 "
          f"activations ({args.decode_tokens} tokens) | int8 activations | cost |\n|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        model = build(method, base)
        for name, text in texts.items():
            exact = perplexity(model, tok, text, tokens=args.tokens, progress=False)
            with fast_prefill():
                fast = perplexity(model, tok, text, tokens=args.tokens, progress=False)
            step = {}
            for path in ("float32", "int8"):
                os.environ["LOWBIT_DECODE_ACTIVATIONS"] = path
                step[path] = decode_perplexity(model, tok, text, args.decode_tokens)
            rows.append({"method": method, "text": name, "exact": exact, "bf16_prefill": fast,
                         "decode_float32": step["float32"], "decode_int8": step["int8"]})
            print(f"| {method} | {name} | {exact:.4f} | {fast:.4f} | {100 * (fast / exact - 1):+.3f}% "
                  f"| {step['float32']:.4f} | {step['int8']:.4f} | {100 * (step['int8'] / step['float32'] - 1):+.3f}% |",
                  flush=True)
        del model
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
