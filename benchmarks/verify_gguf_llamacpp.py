"""llama.cpp runs lowbit's GGUF exports: for each type, the perplexity llama.cpp computes on the exported file against
lowbit's perplexity of the same weights (the file read back by lowbit), same token ids and windows, and a greedy
generation by llama.cpp from its own tokenization of a prompt.

llama.cpp comes from llama-cpp-python, built from source into its own venv (several minutes, once):
    python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install numpy==2.4.6 llama-cpp-python==0.3.36

Usage: python benchmarks/verify_gguf_llamacpp.py [--types f16,q8_0,q4_0,q4_1,tq2_0] [--tokens 4096]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_PY = ROOT / ".venv-llamacpp" / "bin" / "python"

# Runs inside .venv-llamacpp: llama.cpp's log-likelihood of each window of the given token ids, and a generation
# (bench_gguf_quality.py runs it too).
LLAMA_SCORE = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(sys.stdin)
llm = Llama(model_path=job["model"], n_ctx=job["window"], logits_all=True, n_threads=job["threads"], verbose=False,
            n_batch=job["window"])
nll, count, top = 0.0, 0, []
for w in job["windows"]:
    llm.reset()
    llm.eval(w)
    logits = np.asarray(llm.scores[:len(w)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll -= sum(logp[i, w[i + 1]] for i in range(len(w) - 1))
    count += len(w) - 1
    top += logits.argmax(axis=1).tolist()
llm.reset()
out = llm(job["prompt"], max_tokens=job.get("new", 8), temperature=0.0)
print(json.dumps({"nll": nll, "count": count, "top": top, "text": out["choices"][0]["text"]}))
"""


def lowbit_nll(model, windows: list[list[int]]) -> tuple[float, int, list[int]]:
    """(negative log-likelihood, predicted tokens, each position's most likely next token)."""
    import torch

    nll, count, top = 0.0, 0, []
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            nll -= logp[torch.arange(len(w) - 1), ids[0, 1:]].sum().item()
            count += len(w) - 1
            top += logp.argmax(dim=-1).tolist()
    return nll, count, top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4_1,tq2_0")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    if not LLAMA_PY.exists():
        sys.exit(f"{LLAMA_PY} is missing: build llama-cpp-python first (see this script's docstring)")
    import warnings

    import torch

    import lowbit
    from lowbit.app.models import default_gguf
    from lowbit.data import default_text
    from lowbit.eval.speed import machine
    from lowbit.interop.gguf import load_gguf
    from lowbit.interop.gguf_export import export_gguf

    warnings.filterwarnings("ignore")
    native, tok = load_gguf(default_gguf(), progress=False)  # the bundled Q4_1 model in its own codes
    ids = tok(default_text(), return_tensors="pt").input_ids[0][:args.tokens].tolist()
    windows = [ids[i:i + args.window] for i in range(0, len(ids) - 1, args.window) if len(ids[i:i + args.window]) > 1]
    print(f"machine: {machine()}")
    print(f"SmolLM2-135M from the bundled Q4_1 GGUF; {len(ids)} tokens of the bundled Python tutorial text, "
          f"{args.window}-token windows; llama.cpp via llama-cpp-python, its CPU backend, 2 threads\n")
    print("| GGUF type | linear weights written | MB | lowbit ppl (the file read back) | llama.cpp ppl | difference | "
          "same top-1 token | llama.cpp greedy text |\n|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            source = native
            if qtype == "tq2_0":
                # Ternary weights first. Made post-training, they leave noise (perplexity ~1e7), whose perplexity
                # amplifies any difference in how activations are rounded (lowbit: int8 per token; llama.cpp: Q8_K
                # per 256 values): the top-1 agreement column says whether both read the same weights. TQ2_0's
                # blocks of 256 tile only the down projections' 1536-wide rows; the 576-wide ones go out in Q8_0.
                from lowbit.app.models import load_default_model

                source = lowbit.quantize(load_default_model()[0], lowbit.TernaryConfig(), progress=False)
            path = Path(tmp) / f"smollm2-{qtype}.gguf"
            report = export_gguf(source, tok, path, qtype, tokenizer_gguf=default_gguf(), progress=False)
            fallback = len(report.get("fallback", []))
            how = (f"{report['from_codes']} from their own codes" if report["from_codes"]
                   else f"{report['quantized'] - 1 - fallback} quantized by gguf")
            if fallback:  # rows the type's blocks do not tile (576-wide SmolLM2 rows, TQ2_0 blocks of 256)
                how += f", {fallback} in {report['fallback'][0].rsplit('(', 1)[1][:-1]}"
            back, _ = load_gguf(path, progress=False)
            nll, count, top = lowbit_nll(back, windows)
            ours = math.exp(nll / count)
            del back
            job = {"model": str(path), "windows": windows, "window": args.window, "threads": torch.get_num_threads(),
                   "prompt": "The capital of France is"}
            proc = subprocess.run([str(LLAMA_PY), "-c", LLAMA_SCORE], input=json.dumps(job), capture_output=True, text=True)
            if proc.returncode:
                print(f"| {qtype} | {how} | {report['bytes'] / 1e6:.1f} | {ours:.3f} | llama.cpp failed: "
                      f"{proc.stderr.strip().splitlines()[-1:]} | | | |", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            theirs = math.exp(r["nll"] / r["count"])
            assert r["count"] == count
            text = r["text"].replace("\n", " ").replace("|", "/")
            agree = sum(a == b for a, b in zip(top, r["top"])) / len(top)
            print(f"| {qtype} | {how} | {report['bytes'] / 1e6:.1f} | {ours:.3f} | {theirs:.3f} | "
                  f"{100 * (theirs / ours - 1):+.2f}% | {100 * agree:.1f}% | {text!r} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
