"""LLM.int8 on a trained Gemma3-architecture model: lowbit's default (zero-point activations), lowbit absmax and
bitsandbytes' Linear8bitLt, by perplexity ratio and by KL divergence to the fp32 model.

The model is one `lowbit train --arch gemma3` run (trained on the first 90% of wikipedia-sample; its held-out 10%
and python-tutorial are the two texts). Trained this small and this briefly its activations hold few outliers, so
it is also scored with larger outlier features planted without changing its function: in every block, ``k``
channels of each norm's (1 + w) gain are multiplied by ``s`` and the columns of the layers reading them divided by
``s`` (and ``k`` rows of up_proj times ``s``, down_proj's columns divided by ``s``), as trained LLMs grow them.

Usage: python benchmarks/bench_int8_gemma3.py [--model DIR] [--scales 1,20,100] [--channels 4] [--tokens 16384]
(without --model it trains one first: `lowbit train --arch gemma3 --size small --bits 32 --steps 1000`, ~25 min)
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

import lowbit
from lowbit.app.peers import bnb_swap
from lowbit.eval.perplexity import perplexity
from lowbit.train.pretrain import split_text

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "data"
VARIANTS = {
    "lowbit int8 (default, zero-point)": lambda m: lowbit.quantize(m, "int8", progress=False),
    "lowbit int8-absmax": lambda m: lowbit.quantize(m, "int8-absmax", progress=False),
    "bitsandbytes Linear8bitLt": lambda m: bnb_swap(m, "int8"),
}


@torch.no_grad()
def plant_outliers(model, scale: float, channels: int, seed: int = 0):
    """``model`` (a Gemma3ForCausalLM, changed in place) with ``channels`` feature channels per norm and per MLP
    scaled by ``scale`` in the activations and by 1 / ``scale`` in the weights that read them: the same function."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.pre_feedforward_layernorm, (mlp.gate_proj, mlp.up_proj))):
            ch = torch.randperm(norm.weight.numel(), generator=g)[:channels]
            norm.weight[ch] = (1 + norm.weight[ch]) * scale - 1  # Gemma's norm multiplies by (1 + w)
            for linear in readers:
                linear.weight[:, ch] /= scale
        ch = torch.randperm(mlp.up_proj.weight.shape[0], generator=g)[:channels]
        mlp.up_proj.weight[ch] *= scale  # gelu(gate) * up is linear in up
        mlp.down_proj.weight[:, ch] /= scale
    return model


@torch.no_grad()
def kl_to(reference, model, ids: torch.Tensor, window: int) -> float:
    """Mean KL(reference || model) per token over non-overlapping windows of ``ids``."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window].unsqueeze(0)
        p = torch.log_softmax(reference(chunk).logits.float(), -1)
        q = torch.log_softmax(model(chunk).logits.float(), -1)
        total += float((p.exp() * (p - q)).sum())
        count += chunk.shape[1]
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--scales", default="1,20,100")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its fp16-cast notice, logged on every call
    from transformers import AutoTokenizer

    from lowbit.eval.speed import machine

    path = args.model or ROOT / "results" / "gemma3-small"
    if not (path / "lowbit.json").is_file():
        subprocess.run([sys.executable, "-m", "lowbit", "train", "--data", str(SHARED / "wikipedia-sample.txt"),
                        "--arch", "gemma3", "--size", "small", "--bits", "32", "--steps", "1000",
                        "--eval-every", "250", "--save-every", "250", "--out", str(path)], check=True)
    print(f"machine: {machine()}\nmodel: {path}")
    tok = AutoTokenizer.from_pretrained(path)
    texts = {"wikipedia held-out": split_text((SHARED / "wikipedia-sample.txt").read_text(), 0.1)[1],
             "python-tutorial": (SHARED / "python-tutorial.txt").read_text()}
    ids = {t: tok(x, return_tensors="pt").input_ids[0][:args.tokens] for t, x in texts.items()}
    rows = []
    for scale in [float(s) for s in args.scales.split(",")]:
        base = plant_outliers(lowbit.load(path).float().eval(), scale, args.channels)
        ref = {t: perplexity(base, tok, texts[t], args.tokens, args.window, progress=False) for t in texts}
        print(f"\nplanted outliers x{scale:g} on {args.channels} channels; fp32 perplexity "
              + ", ".join(f"{t} {v:.3f}" for t, v in ref.items()))
        print(f"| {'variant':34s} | " + " | ".join(f"{t} ppl ratio | {t} KL" for t in texts) + " |")
        for name, make in VARIANTS.items():
            model = make(copy.deepcopy(base)).eval()
            row = {"scale": scale, "variant": name}
            for t in texts:
                row[f"{t} ratio"] = perplexity(model, tok, texts[t], args.tokens, args.window, progress=False) / ref[t]
                row[f"{t} kl"] = kl_to(base, model, ids[t], args.window)
            rows.append(row)
            print(f"| {name:34s} | " + " | ".join(f"{row[f'{t} ratio']:.5f} | {row[f'{t} kl']:.3e}" for t in texts)
                  + " |", flush=True)
    out = ROOT / "results" / "int8_gemma3.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
