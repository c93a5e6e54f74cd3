"""Quality of the GGUF files users run: lowbit's GPTQ-calibrated files of each llama.cpp type against llama.cpp's own
files of the same type and size, with and without its importance matrix, on three texts (issue 35).

Protocol:
- SmolLM2-135M (fp32, from the bundled GGUF). Calibration: 16 sequences of 512 tokens from each of the two shared
  texts past their first 8192 tokens (the evaluated part), the same 32 sequences for lowbit's GPTQ and, as text,
  for llama.cpp's llama-imatrix.
- Evaluation: the first --tokens tokens of python-tutorial and wikipedia-sample, and of the Python 3.11 library
  reference (apt-get install python3.11-doc: HTML to text), which no calibration saw; 512-token windows, every
  token scored; perplexity, its ratio to fp32 and the mean KL(fp32 || file) per token.
- Every file is read back by lowbit (``load_gguf``) for the table. llama.cpp then scores each file on the first
  windows of wikipedia-sample with the same token ids (llama-cpp-python, logits of every position) and writes a
  greedy continuation: its perplexity must match lowbit's within 0.5%.
- Both sides write token_embd (the tied head) in Q8_0, so that a type's files differ only in the linear weights.
  "bpw" counts the linear layers' bytes: blocks of 32 carry their fp16 scale (and min).

llama.cpp's tools (llama-imatrix, llama-quantize) are built from the llama.cpp that llama-cpp-python 0.3.36 vendors,
with the AVX-512 flags of DEVELOPERS.md, into .venv-llamacpp/bin; --build-tools does it (about 9 minutes here):
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36, then in vendor/llama.cpp:
    CFLAGS/CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    -DBUILD_SHARED_LIBS=OFF && cmake --build build --target llama-imatrix llama-quantize

Usage: python benchmarks/bench_gguf_quality.py [--tokens 8192] [--types q4_0,iq4_nl,q5_0,q8_0] [--json F]
"""
from __future__ import annotations

import argparse
import copy
import html.parser
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from verify_gguf_llamacpp import LLAMA_SCORE

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-llamacpp"
LLAMA_PY = VENV / "bin" / "python"
SHARED = ROOT.parent / "shared" / "data"
LIBDOCS = Path("/usr/share/doc/python3.11/html/library")
FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # GCC 12 miscompiles llama.cpp's AMX code (DEVELOPERS.md)
# llama.cpp's files for the table beyond the per-type ones: its mixes (Q4_K_M's rules) and 3-bit types
LLAMA_MIXES = ("Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_M", "Q3_K_S", "IQ3_S")



class _Text(html.parser.HTMLParser):
    """The text of a page of the Python docs: what is inside <script>, <style>, <head>, <nav> and the
    navigation and footer divs is left out."""

    SKIP = ("script", "style", "head", "nav")
    SKIP_DIVS = ("sphinxsidebar", "related", "footer")

    def __init__(self) -> None:
        super().__init__()
        self.parts, self.inside, self.divs = [], 0, []  # divs: for each open div, whether it is skipped

    def handle_starttag(self, tag, attrs):
        self.inside += tag in self.SKIP
        if tag == "div":
            cls = dict(attrs).get("class") or ""
            self.divs.append(any(c in cls.split() for c in self.SKIP_DIVS))

    def handle_endtag(self, tag):
        self.inside -= tag in self.SKIP and self.inside > 0
        if tag == "div" and self.divs:
            self.divs.pop()

    def handle_data(self, data):
        if not self.inside and not any(self.divs):
            self.parts.append(data)


def library_docs() -> str:
    """The Python 3.11 library reference as plain text, pages in name order (python3.11-doc)."""
    if not LIBDOCS.is_dir():
        sys.exit(f"{LIBDOCS} is missing: apt-get install python3.11-doc (the third, never-calibrated text)")
    pages = []
    for page in sorted(LIBDOCS.glob("*.html")):
        p = _Text()
        p.feed(page.read_text(encoding="utf-8", errors="replace"))
        body = "".join(p.parts)
        body = "\n".join(line.rstrip() for line in body.splitlines() if line.strip())
        pages.append(body)
    return "\n\n".join(pages)


def build_tools() -> None:
    """llama-imatrix and llama-quantize from the llama.cpp that llama-cpp-python 0.3.36 vendors, into VENV/bin."""
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([str(VENV / "bin" / "pip"), "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python==0.3.36", "-d", work], check=True)
        subprocess.run(["tar", "xzf", next(Path(work).glob("*.tar.gz")), "-C", work], check=True)
        src = next(Path(work).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        env = {**os.environ, "CFLAGS": FLAGS, "CXXFLAGS": FLAGS}
        subprocess.run(["cmake", "-B", "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF",
                        "-DCMAKE_BUILD_TYPE=Release"], cwd=src, env=env, check=True)
        subprocess.run(["cmake", "--build", "build", "-j2", "--target", "llama-imatrix", "llama-quantize"], cwd=src,
                       env=env, check=True)
        for tool in ("llama-imatrix", "llama-quantize"):
            shutil.copy2(src / "build" / "bin" / tool, VENV / "bin" / tool)


def tool(name: str) -> str:
    path = VENV / "bin" / name
    if not path.exists():
        sys.exit(f"{path} is missing: run with --build-tools (needs {LLAMA_PY}: see bench_e2e.py --build-llamacpp)")
    return str(path)


def calibration(tok) -> tuple[torch.Tensor, str]:
    """32 sequences of 512 tokens, 16 from each shared text past its first 8192 tokens; and the same as text."""
    from lowbit.calibrate import calibration_batches
    from lowbit.data import default_text

    ids = torch.cat([calibration_batches(tok, default_text(), n_samples=16, skip_tokens=8192),
                     calibration_batches(tok, (SHARED / "wikipedia-sample.txt").read_text(encoding="utf-8"),
                                         n_samples=16, skip_tokens=8192)])
    return ids, "\n\n".join(tok.decode(s) for s in ids)


def linear_bits(path: Path) -> tuple[float, dict[str, int]]:
    """Bits per weight of the file's linear layers (blk.* matrices), and how many tensors each type holds."""
    from gguf import GGUFReader

    bits = params = 0
    kinds: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bits += int(t.n_bytes) * 8
            params += int(t.n_elements)
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return bits / params, kinds


def llama_score(path: Path, windows: list[list[int]]) -> dict:
    job = {"model": str(path), "windows": windows, "window": 512, "threads": torch.get_num_threads(),
           "prompt": "The capital of France is", "new": 12}
    done = subprocess.run([str(LLAMA_PY), "-c", LLAMA_SCORE], input=json.dumps(job), capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ppl": math.exp(r["nll"] / r["count"]), "text": r["text"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of each text evaluated")
    ap.add_argument("--check-tokens", type=int, default=2048, help="tokens of wikipedia-sample llama.cpp scores")
    ap.add_argument("--types", default="q4_0,iq4_nl,q5_0,q8_0")
    ap.add_argument("--mixes", default=",".join(LLAMA_MIXES), help="llama.cpp's mixes and 3-bit types to add")
    ap.add_argument("--rotate-types", default="q4_0,iq4_nl", help="GGUF types made from the rotated model too")
    ap.add_argument("--mix-bits", default="4.5,5.0", help="budgets of lowbit advise --gguf's mixed files")
    ap.add_argument("--own", default="nf4,gptq4,gptq3", help="lowbit's own formats, plain and rotated (no GGUF)")
    ap.add_argument("--no-llamacpp", action="store_true", help="leave out llama.cpp's files (and its imatrix)")
    ap.add_argument("--merge", type=Path, default=None, help="a log of an earlier run: its rows join this table")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--build-tools", action="store_true")
    args = ap.parse_args()
    if args.build_tools:
        build_tools()
    imatrix_tool, quantize_tool = tool("llama-imatrix"), tool("llama-quantize")

    from bench_quality import score, windows_of

    import lowbit
    from lowbit.app.models import load_default_model
    from lowbit.data import default_text
    from lowbit.eval.speed import machine
    from lowbit.interop.gguf import load_gguf
    from lowbit.analysis.sensitivity import measure_sensitivity
    from lowbit.app.advisor import GGUF_FORMATS, advise_gguf, format_counts
    from lowbit.app.compare import linear_bits_per_param
    from lowbit.eval import memory_report
    from lowbit.interop.gguf_export import export_gguf
    from lowbit.rotation import rotate

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    fp, tok = load_default_model()
    texts = {"python-tutorial": default_text(),
             "wikipedia-sample": (SHARED / "wikipedia-sample.txt").read_text(encoding="utf-8"),
             "library-docs (held out)": library_docs()}
    windows = {name: windows_of(tok, body, args.tokens) for name, body in texts.items()}
    refs = {}
    for name, wins in windows.items():
        ppl, _, refs[name] = score(fp, wins)
        refs[name] = (ppl, refs[name])
    check = [w.tolist() for w in windows_of(tok, texts["wikipedia-sample"], args.check_tokens)]
    ids, calib_text = calibration(tok)
    print(f"machine: {machine()}")
    print("fp32: " + ", ".join(f"{n} {refs[n][0]:.3f}" for n in texts), flush=True)

    rows = []

    def measure_model(label: str, model, info: dict) -> dict:
        row = {"file": label, **info}
        for name, wins in windows.items():
            ppl, kl, _ = score(model, wins, [r.float() for r in refs[name][1]])
            row[name] = {"ppl": ppl, "ratio": ppl / refs[name][0], "kl": kl}
        rows.append(row)
        return row

    def measure(label: str, path: Path, made_s: float) -> None:
        model, _ = load_gguf(path, progress=False)
        bpw, kinds = linear_bits(path)
        row = measure_model(label, model, {"bytes": path.stat().st_size, "bpw": bpw, "types": kinds, "made_s": made_s})
        nll = 0.0
        with torch.no_grad():
            for w in check:
                lp = model(torch.tensor([w])).logits[0, :-1].double().log_softmax(-1)
                nll -= float(lp.gather(1, torch.tensor(w[1:])[:, None]).sum())
        row["check"] = {"lowbit_ppl": math.exp(nll / sum(len(w) - 1 for w in check)), **llama_score(path, check)}
        print(json.dumps(row), flush=True)

    rotated = rotate(copy.deepcopy(fp))
    with torch.no_grad():
        drift = float((rotated(windows["wikipedia-sample"][0][None]).logits - fp(windows["wikipedia-sample"][0][None]).logits).abs().max())
    print(f"rotated fp32 model: max |logit difference| from the original on a 512-token window: {drift:.2e}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = work / "smollm2-f32.gguf"
        export_gguf(fp, tok, base, "f32", progress=False)
        (work / "calib.txt").write_text(calib_text, encoding="utf-8")
        if not args.no_llamacpp:
            t = time.perf_counter()
            subprocess.run([imatrix_tool, "-m", str(base), "-f", str(work / "calib.txt"), "-o",
                            str(work / "imatrix.gguf"), "-c", "512", "-t", str(torch.get_num_threads())],
                           check=True, capture_output=True)
            imatrix_s = time.perf_counter() - t
            llama_types = [t.upper() for t in args.types.split(",")] + [m for m in args.mixes.split(",") if m]
            for ftype in llama_types:
                for imatrix in (False, True):
                    if not imatrix and ftype in LLAMA_MIXES[1:]:
                        continue  # the mixes beyond Q4_K_M: with the importance matrix only
                    out = work / f"llama-{ftype}{'-imatrix' if imatrix else ''}.gguf"
                    cmd = [quantize_tool, "--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
                    cmd += ["--imatrix", str(work / "imatrix.gguf")] if imatrix else []
                    t = time.perf_counter()
                    done = subprocess.run(cmd + [str(base), str(out), ftype, str(torch.get_num_threads())],
                                          capture_output=True, text=True)
                    if done.returncode:
                        print(f"llama-quantize {ftype}: {done.stderr.strip()[-300:]}", file=sys.stderr)
                        continue
                    made = time.perf_counter() - t + (imatrix_s if imatrix else 0.0)
                    measure(f"llama.cpp {ftype}" + (" imatrix" if imatrix else ""), out, made)
                    out.unlink()

        def lowbit_file(label: str, source, how, qtype: str = "q4_0") -> None:
            t = time.perf_counter()
            q = lowbit.quantize(copy.deepcopy(source), how, calibration=ids, progress=False)
            out = work / "lowbit.gguf"
            export_gguf(q, tok, out, qtype, progress=False)
            del q
            measure(label, out, time.perf_counter() - t)
            out.unlink()

        for qtype in [t for t in args.types.split(",") if t]:
            lowbit_file(f"lowbit GPTQ {qtype.upper()}", fp, f"gptq-{qtype}", qtype)
        for qtype in [t for t in args.rotate_types.split(",") if t]:
            lowbit_file(f"lowbit GPTQ {qtype.upper()} rotated", rotated, f"gptq-{qtype}", qtype)
        if args.mix_bits:
            t = time.perf_counter()
            sens = measure_sensitivity(fp, ids[::4, :256], GGUF_FORMATS, kl=False, progress=False)
            sens_s = time.perf_counter() - t
            print(f"sensitivities of {len(GGUF_FORMATS)} GGUF types: {sens_s:.0f} s", flush=True)
            for b in [float(x) for x in args.mix_bits.split(",")]:
                advice = advise_gguf(sens, bits=b)
                lowbit_file(f"lowbit mix <= {b} bpw ({', '.join(f'{n} {f[5:]}' for f, n in format_counts(advice).items())})",
                            fp, advice.plan)
    for how in [h for h in args.own.split(",") if h]:
        for rot in (False, True):
            t = time.perf_counter()
            q = lowbit.quantize(copy.deepcopy(rotated if rot else fp), how, calibration=ids, progress=False)
            info = {"bytes": memory_report(q)["total_bytes"], "bpw": linear_bits_per_param(q), "types": {how: 1},
                    "made_s": time.perf_counter() - t, "check": {}}
            row = measure_model(f"lowbit {how} (own format){' rotated' if rot else ''}", q, info)
            print(json.dumps(row), flush=True)
            del q
    if args.merge:  # rows a crashed run printed (one JSON object a line), measured as this run measures them
        rows += [json.loads(line) for line in args.merge.read_text().splitlines() if line.startswith("{")]
    print()
    print(table(rows, list(texts)))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "tokens": args.tokens, "rotation_drift": drift,
                                         "fp32": {n: refs[n][0] for n in texts}, "rows": rows}, indent=1))


def table(rows: list[dict], texts: list[str]) -> str:
    head = " | ".join(f"{t}: ppl (x fp32), KL" for t in texts)
    lines = [f"| file | MB | bpw (linear) | {head} | llama.cpp ppl / lowbit's, wikipedia | runs |",
             "|---|---|---|" + "---|" * len(texts) + "---|---|"]
    for r in sorted(rows, key=lambda r: (r["bpw"], r["file"])):
        cells = " | ".join(f"{r[t]['ppl']:.3f} ({r[t]['ratio']:.4f}x), {r[t]['kl']:.4f}" for t in texts)
        c = r["check"]
        agree = (f"{c['ppl'] / c['lowbit_ppl'] - 1:+.2%}" if "ppl" in c else
                 f"failed: {c.get('error')}" if c else "(not a GGUF)")
        runs = repr(c.get("text", "")).replace("|", "/")
        lines.append(f"| {r['file']} | {r['bytes'] / 1e6:.1f} | {r['bpw']:.3f} | {cells} | {agree} | {runs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
