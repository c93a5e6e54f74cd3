"""End-to-end decode and prefill speed of SmolLM2-135M: lowbit's formats on lowbit.generate's decode loop against
llama.cpp on the same model, same machine, same run (issue 17).

For each thread count: a prompt of --prompt tokens (prefill, logits of the last position only, as llama.cpp computes
them), then --new greedy tokens one at a time; median of --repeats runs. Each row's ms per decoded token is split
into the time its weights take to read at the bandwidth this run measured (bytes read per token / GB/s of the
project's read probe at that thread count) and the rest (dispatch, attention, norms, kernels below bandwidth).

llama.cpp comes from llama-cpp-python 0.3.36 built from source into its own venv with its AVX-512 paths (GCC 12
miscompiles only its AMX tile code, so only AMX is switched off; an AVX2 build would be a handicapped peer).
--build-llamacpp makes it (4-30 minutes, once):
    python3 -m venv .venv-llamacpp && CMAKE_ARGS="-DGGML_NATIVE=ON" CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" .venv-llamacpp/bin/pip install numpy==2.4.6 llama-cpp-python==0.3.36
It runs on the bundled Q4_1 file and on Q4_0, IQ4_NL and Q8_0 files that llama.cpp's own quantizer makes from
lowbit's F16 export of the model.

The targets (issue 34) pair each lowbit format with llama.cpp's nearest: the Q4_1 file in its own codes
(native-q4_1) with llama.cpp on that file, NF4 + int8 embeddings with Q4_0, int8 weight-only + int8 embeddings with
Q8_0; the table after the rows gives lowbit / llama.cpp for decode and prefill at each thread count.

Usage: python benchmarks/bench_e2e.py [--threads 1,2] [--repeats 5] [--methods ...] [--busy] [--json F]
--busy runs everything again with a competing process spinning on one core.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import median_seconds

ROOT = Path(__file__).resolve().parent.parent
LLAMA_PY = ROOT / ".venv-llamacpp" / "bin" / "python"
METHODS = ("fp32", "bf16", "int8-weight", "llm-int8", "llm-int8-absmax", "nf4", "nf4-dq", "nf4-bf16", "native-q4_1",
           "ternary", "nf4+int8-emb", "int8-weight+int8-emb", "native-q4_1+int8-emb")
TARGET_METHODS = ("native-q4_1,native-q4_1+int8-emb,nf4+int8-emb,int8-weight+int8-emb,nf4,fp32,native-q4_1@python,"
                  "nf4+int8-emb@python")
# nf4 is NF4 without double quantization (NF4Config's default turns it on: that is nf4-dq); nf4-bf16 computes in
# bf16 (NF4Config(compute_dtype=torch.bfloat16)), which runs the bf16-dot kernel on CPUs with AVX512_BF16.
# +int8-emb: the token embeddings and the head tied to them in int8 rows (lowbit.quantize_embeddings, the
# Plan(embeddings="int8") of the CLI). METHOD@python: the Python decode step (LOWBIT_NATIVE=0), the native step's
# predecessor; METHOD@transformers: transformers' own forward and cache (HFDecoder). METHOD@auto: decode threads
# chosen while decoding, as lowbit.generate(threads="auto") does (ThreadChooser).
# lowbit format -> the llama.cpp file it is held against (issue 34's targets)
# (native-q4_1+int8-emb: the file's Q8_0 token embeddings, which lowbit dequantizes to fp32, kept as int8 rows)
TARGETS = {"native-q4_1": "llama.cpp Q4_1 (bundled)", "native-q4_1+int8-emb": "llama.cpp Q4_1 (bundled)",
           "nf4+int8-emb": "llama.cpp Q4_0 (its quantizer)", "int8-weight+int8-emb": "llama.cpp Q8_0 (its quantizer)"}
LLAMA_BUILD = ('python3 -m venv .venv-llamacpp && CMAKE_ARGS="-DGGML_NATIVE=ON" '
               'CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" '
               '.venv-llamacpp/bin/pip install numpy==2.4.6 llama-cpp-python==0.3.36')

# Runs inside .venv-llamacpp: prefill and greedy decode times of one GGUF file at each thread count.
_LLAMA = r"""
import json, statistics, sys, time
from llama_cpp import Llama
job = json.load(sys.stdin)
out = {}
for threads in job["threads"]:
    llm = Llama(model_path=job["model"], n_ctx=job["ctx"], n_batch=job["ctx"], n_threads=threads,
                n_threads_batch=threads, verbose=False)
    prefill, decode = [], []
    for run in range(job["repeats"] + 1):  # the first run warms up
        llm.reset()
        t = time.perf_counter(); llm.eval(job["prompt"]); tp = time.perf_counter() - t
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        t = time.perf_counter()
        for _ in range(job["new"]):
            llm.eval([token]); token = int(llm.scores[llm.n_tokens - 1].argmax())
        if run:
            prefill.append(tp); decode.append(time.perf_counter() - t)
    out[threads] = {"prefill_s": statistics.median(prefill), "decode_s": statistics.median(decode)}
    del llm
print(json.dumps(out))
"""

_QUANTIZE = r"""
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def weight_bytes_per_token(model) -> int:
    """Bytes of every weight one decode step reads: the linear layers and the LM head (one embedding row aside)."""
    from torch import nn

    from lowbit.nn import QuantLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.stored_bits() // 8 + (module.bias.numel() * 4 if module.bias is not None else 0)
        elif isinstance(module, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def gguf_bytes_per_token(path: Path) -> int:
    """The same for a GGUF file: every tensor but the norms (token_embd counts as the tied output head)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if not t.name.endswith("norm.weight"))


def build(method: str, base):
    """SmolLM2-135M in ``method`` (a fresh copy)."""
    import torch

    import lowbit
    from lowbit.app.models import load_native

    name, _, head = method.split("@")[0].partition("+")
    if name == "native-q4_1":
        model, _ = load_native("smollm2-135m", progress=False)
    else:
        model = copy.deepcopy(base)
        configs = {"int8-weight": lowbit.Int8Config(weight_only=True), "llm-int8": lowbit.Int8Config(),
                   "llm-int8-absmax": lowbit.Int8Config(activations="absmax"),
                   "nf4": lowbit.NF4Config(double_quant=False), "nf4-dq": lowbit.NF4Config(double_quant=True),
                   "nf4-bf16": lowbit.NF4Config(double_quant=False, compute_dtype=torch.bfloat16),
                   "ternary": lowbit.TernaryConfig()}
        if name == "bf16":
            model = model.to(torch.bfloat16)
        elif name in configs:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # post-training ternary: speed only, its quality is noise
                lowbit.quantize(model, configs[name], progress=False)
        elif name != "fp32":
            raise SystemExit(f"unknown method {method!r}: expected some of {', '.join(METHODS)}")
    if head == "int8-emb":
        lowbit.quantize_embeddings(model, "int8")
    elif head:
        raise SystemExit(f"unknown method {method!r}: the one suffix is +int8-emb")
    return model.eval()


def bandwidth(threads: int) -> float:
    """GB/s of the project's read probe (``bench_kernels.read_probe``: 256 MB, every thread reading) at ``threads``."""
    import torch

    from bench_kernels import read_probe

    torch.set_num_threads(threads)
    nbytes, read = read_probe()
    return nbytes / median_seconds(read, 7) / 1e9


def llama_rows(files: dict[str, Path], prompt: list[int], new: int, repeats: int, threads: list[int]) -> dict:
    rows = {}
    for name, path in files.items():
        job = {"model": str(path), "prompt": prompt, "new": new, "repeats": repeats, "threads": threads,
               "ctx": len(prompt) + new + 8}
        done = subprocess.run([str(LLAMA_PY), "-c", _LLAMA], input=json.dumps(job), capture_output=True, text=True,
                              timeout=1800)
        if done.returncode:
            print(f"llama.cpp failed on {name}: {done.stderr.strip()[-400:]}", file=sys.stderr)
            continue
        rows[name] = {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    return rows


def llama_files(work: Path, base, tok) -> dict[str, Path]:
    """The bundled Q4_1 file, and Q4_0, IQ4_NL and Q8_0 files made by llama.cpp's quantizer from lowbit's F16
    export of the model."""
    from lowbit.app.models import default_gguf
    from lowbit.interop.gguf_export import export_gguf

    files = {"llama.cpp Q4_1 (bundled)": default_gguf()}
    f16 = work / "smollm2-f16.gguf"
    export_gguf(base, tok, f16, "f16", progress=False)
    for ftype in ("Q4_0", "IQ4_NL", "Q8_0"):
        out = work / f"smollm2-{ftype.lower()}.gguf"
        done = subprocess.run([str(LLAMA_PY), "-c", _QUANTIZE, str(f16), str(out), ftype], capture_output=True,
                              text=True)
        if done.returncode == 0 and out.exists():
            files[f"llama.cpp {ftype} (its quantizer)"] = out
        else:
            print(f"llama.cpp could not quantize to {ftype}: {done.stderr.strip()[-300:]}", file=sys.stderr)
    return files


def ensure_llamacpp(build: bool) -> bool:
    """Whether llama.cpp's venv is there; with ``build``, make it first (the AVX-512 build, see the docstring)."""
    if LLAMA_PY.exists() or not build:
        return LLAMA_PY.exists()
    print(f"building llama.cpp (several minutes): {LLAMA_BUILD}", file=sys.stderr)
    return subprocess.run(LLAMA_BUILD, shell=True, cwd=ROOT).returncode == 0 and LLAMA_PY.exists()


def llama_build_line() -> str:
    """How the llama.cpp that ran was built: its version and the CPU features its ggml reports."""
    code = ("import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_print_system_info().decode().strip())")
    done = subprocess.run([str(LLAMA_PY), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()[-200:]


def run(args, busy: bool) -> list[dict]:
    import torch

    from lowbit.app.models import load_default_model
    from lowbit.eval.speed import speed

    threads = [int(t) for t in args.threads.split(",")]
    base, tok = load_default_model()
    # llama.cpp's prompt: the ids lowbit's speed() draws (its seed 0 over the vocabulary)
    prompt = torch.randint(0, base.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    bw = {t: bandwidth(t) for t in threads}
    rows = []
    for method in args.methods.split(","):
        model = build(method, base)
        nbytes = weight_bytes_per_token(model)
        for t in threads:
            torch.set_num_threads(t)
            os.environ["LOWBIT_NATIVE"] = "0" if method.endswith("@python") else "1"
            r = speed(model, args.prompt, args.new, args.repeats,
                      decoder="transformers" if method.endswith("@transformers") else "lean",
                      threads="auto" if method.endswith("@auto") else None)
            os.environ.pop("LOWBIT_NATIVE")
            rows.append({"engine": "lowbit", "method": method, "threads": t, "bytes": nbytes, "bw": bw[t],
                         "prefill_s": r["prefill_s"], "decode_s": r["decode_s"]})
        del model
    if not args.no_llamacpp and ensure_llamacpp(args.build_llamacpp):
        with tempfile.TemporaryDirectory() as work:
            files = llama_files(Path(work), base, tok)
            for name, per_thread in llama_rows(files, prompt[0].tolist(), args.new, args.repeats, threads).items():
                for t, r in per_thread.items():
                    rows.append({"engine": "llama.cpp", "method": name, "threads": t,
                                 "bytes": gguf_bytes_per_token(files[name]), "bw": bw[t], **r})
    elif not args.no_llamacpp:
        print(f"no llama.cpp: {LLAMA_PY} is missing (--build-llamacpp makes it)", file=sys.stderr)
    for r in rows:
        r.update(busy=busy, prompt=args.prompt, new=args.new)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| engine | format | threads | decode tok/s | ms/token | of which weight read | rest | MB read/token "
             "| prefill tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["threads"], r["engine"] != "llama.cpp", r["method"])):
        ms = r["decode_s"] / r["new"] * 1e3
        read = r["bytes"] / (r["bw"] * 1e9) * 1e3
        lines.append(f"| {r['engine']} | {r['method']} | {r['threads']} | {r['new'] / r['decode_s']:.1f} | {ms:.2f} "
                     f"| {read:.2f} | {ms - read:.2f} | {r['bytes'] / 1e6:.1f} | {r['prompt'] / r['prefill_s']:.0f} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> str:
    """lowbit / llama.cpp, decode and prefill, for each pair of TARGETS both sides of which ran."""
    by = {(r["engine"], r["method"], r["threads"]): r for r in rows}
    lines = ["| lowbit | llama.cpp | threads | decode tok/s lowbit / llama.cpp | ratio | prefill tok/s lowbit / "
             "llama.cpp | ratio |", "|---|---|---|---|---|---|---|"]
    for ours, theirs in TARGETS.items():
        for t in sorted({r["threads"] for r in rows}):
            a, b = by.get(("lowbit", ours, t)), by.get(("llama.cpp", theirs, t))
            if a is None or b is None:
                continue
            da, db = a["new"] / a["decode_s"], b["new"] / b["decode_s"]
            pa, pb = a["prompt"] / a["prefill_s"], b["prompt"] / b["prefill_s"]
            lines.append(f"| {ours} | {theirs} | {t} | {da:.1f} / {db:.1f} | **{da / db:.2f}x** | {pa:.0f} / {pb:.0f} "
                         f"| **{pa / pb:.2f}x** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--methods", default=TARGET_METHODS, help=f"comma-separated, of {', '.join(METHODS)} (each "
                    "may end in @python, @transformers or @auto)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--build-llamacpp", action="store_true", help="build llama.cpp's venv first if it is missing")
    ap.add_argument("--busy", action="store_true", help="also run with a process spinning on one core")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args()

    import torch

    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    if LLAMA_PY.exists():
        print(f"llama.cpp: llama-cpp-python {llama_build_line()}")
    rows = run(args, busy=False)
    probe = ", ".join(f"{r['bw']:.1f} GB/s at {r['threads']} thread(s)" for r in rows if r["method"] == rows[0]["method"])
    print(f"\nquiet machine: prompt {args.prompt} tokens, greedy decode {args.new}, median of {args.repeats}; "
          f"read probe {probe}")
    print(table(rows))
    print("\ntargets (quiet):")
    print(targets(rows))
    if args.busy:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            busy_rows = run(args, busy=True)
        finally:
            hog.kill()
        print("\nwith a process spinning on one core (load 1 of 2):")
        print(table(busy_rows))
        print(targets(busy_rows))
        rows += busy_rows
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
