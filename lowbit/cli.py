"""The ``lowbit`` command: quantize, eval, compare, outliers, demo and doctor."""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

_WIDE = None if sys.stdout.isatty() else 130  # piped or logged: do not squeeze tables to 80 columns
console = Console(width=_WIDE)
err = Console(stderr=True, width=_WIDE)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lowbit: make language models small (8, 4, 3 and 1.58 bits) and measure what it costs.")

MODEL_HELP = "smollm2-135m (bundled), a .gguf file, a transformers folder, or a lowbit checkpoint folder"
TEXT_HELP = "text file to evaluate on (default: the bundled Python Tutorial)"


SPEED_PROTOCOL = "prefill of 128 tokens, greedy decode of 16 tokens with the KV cache, batch 1, median of 3 runs"


class UserError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def friendly(fn):
    """Turn the errors a user can cause into one red line and exit code 2 (bugs still show a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lowbit.checkpoint import CheckpointError

        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                CheckpointError, ValueError, TypeError) as e:
            err.print(f"[bold red]error:[/] {_first_line(e)}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _setup() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")


def _text(path: Optional[Path]) -> tuple[str, str]:
    from lowbit.data import DEFAULT_TEXT, default_text

    if path is None:
        return default_text(), f"{DEFAULT_TEXT.name} (bundled)"
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    return path.read_text(encoding="utf-8", errors="replace"), str(path)


def _methods(spec: str) -> list[str]:
    from lowbit.methods import check_method

    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise UserError("--methods is empty")
    return [check_method(m) for m in names]


def _load(spec: str, encoders: bool = False):
    """(model, tokenizer) by lowbit.models.load_model (load_any with ``encoders``); load failures as one line."""
    from lowbit.models import load_any, load_model

    with console.status(f"loading {spec}"):
        try:
            return (load_any if encoders else load_model)(spec)
        except FileNotFoundError:
            raise
        except (OSError, KeyError, ValueError) as e:  # transformers' ways of saying "not a model I know"
            raise UserError(f"cannot load {spec}: {_first_line(e)}") from None


def _protocol(tokens: int, window: int, stride: Optional[int], text_name: str, dtype: str = "float32 compute") -> str:
    windows = "non-overlapping windows" if not stride or stride == window else f"sliding windows, stride {stride}"
    return f"perplexity on the first {tokens} tokens of {text_name}, {window}-token {windows}, {dtype}"


@app.command()
@friendly
def quantize(
    model: str = typer.Argument(..., help=MODEL_HELP),
    method: str = typer.Option("nf4", "--method", "-m",
                               help="int8 | int8-zp | int8-weight | nf4 | fp4 | int4 | ternary | rtn | gptq | spqr | bf16"),
    bits: Optional[int] = typer.Option(None, help="bits of rtn / gptq / spqr (2, 3, 4 or 8; default 4, spqr 3)"),
    calib_text: Optional[Path] = typer.Option(None, help="calibration text of gptq / spqr (default: the bundled text past its first 8192 tokens)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the lowbit checkpoint"),
    blocksize: Optional[int] = typer.Option(None, help="block / group size (nf4, fp4, int4: 64; rtn, gptq: 128; spqr: 16)"),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant", help="quantize the 4-bit absmax too"),
    threshold: Optional[float] = typer.Option(None, help="LLM.int8 outlier threshold (default 6.0; 0 turns it off)"),
    max_shard_size: str = typer.Option("2GB", help="largest safetensors shard"),
) -> None:
    """Quantize MODEL and save it (with its tokenizer) as a lowbit checkpoint.

    Example: lowbit quantize smollm2-135m --method nf4 --out smollm2-nf4
    """
    _setup()
    import lowbit
    from lowbit.methods import apply_method, check_method, needs_calibration

    check_method(method)
    if method == "fp32":
        raise UserError("fp32 is the unquantized model: choose a method such as nf4 or int8")
    if bits is not None and bits not in (2, 3, 4, 8):
        raise UserError(f"--bits must be 2, 3, 4 or 8, got {bits}")
    m, tok = _load(model)
    calibration = None
    if needs_calibration(method):
        from lowbit.calibrate import calibration_batches

        body, _ = _text(calib_text)
        calibration = calibration_batches(tok, body, skip_tokens=0 if calib_text else 8192)
    t = time.perf_counter()
    apply_method(m, method, calibration=calibration, blocksize=blocksize, double_quant=double_quant, threshold=threshold,
                 bits=bits)
    seconds = time.perf_counter() - t
    lowbit.save(m, out, tokenizer=tok, max_shard_size=max_shard_size)
    r = lowbit.memory_report(m)
    console.print(f"[green]saved[/] {out}: {method}, {r['total_bytes'] / 1e6:.1f} MB "
                  f"({r['bits_per_param']:.2f} bits/param over the whole model; fp32 {r['fp32_bytes'] / 1e6:.1f} MB), "
                  f"quantized in {seconds:.1f} s")


@app.command("eval")
@friendly
def eval_(
    model: str = typer.Argument(..., help=MODEL_HELP),
    method: str = typer.Option("fp32", "--method", "-m", help="quantize on the fly before measuring (fp32: as loaded)"),
    text: Optional[Path] = typer.Option(None, help=TEXT_HELP),
    tokens: int = typer.Option(8192, help="tokens of the text to score"),
    window: int = typer.Option(512, help="tokens per window"),
    stride: Optional[int] = typer.Option(None, help="sliding-window stride (default: non-overlapping windows)"),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="measure prefill and decode tokens/s"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures to this JSON file"),
) -> None:
    """Perplexity, prefill/decode speed and memory of MODEL (a checkpoint folder or a model to quantize on the fly).

    Example: lowbit eval smollm2-nf4 --tokens 4096     (or: lowbit eval smollm2-135m --method int8)
    """
    _setup()
    from lowbit.compare import linear_bits_per_param, measure
    from lowbit.eval.speed import machine
    from lowbit.methods import apply_method, check_method, needs_calibration

    check_method(method)
    if tokens < 2 or window < 2 or (stride is not None and not 0 < stride <= window):
        raise UserError("--tokens and --window must be >= 2, and --stride in 1..window")
    body, text_name = _text(text)
    m, tok = _load(model)
    if method != "fp32":
        calibration = None
        if needs_calibration(method):
            from lowbit.calibrate import calibration_batches

            calibration = calibration_batches(tok, body, skip_tokens=max(tokens, 8192))
        apply_method(m, method, calibration=calibration)
    row = measure(m, tok, body, tokens, window, stride, with_speed=speed)
    row.update(model=model, method=method, protocol=_protocol(tokens, window, stride, text_name), machine=machine())
    console.print(f"[bold]{model}[/] ({method}): perplexity [bold]{row['perplexity']:.3f}[/]  ({row['protocol']})")
    console.print(f"memory {row['model_mb']:.1f} MB, {row['bits_per_param_model']:.2f} bits/param (model), "
                  f"{linear_bits_per_param(m):.3f} bits/param (linear layers)")
    if speed:
        console.print(f"prefill {row['prefill_tok_s']:.0f} tok/s, decode {row['decode_tok_s']:.1f} tok/s ({SPEED_PROTOCOL}) "
                      f"on {row['machine']}")
    if json_out:
        json_out.write_text(json.dumps(row, indent=1, default=str))


def run_compare(model: str, methods: list[str], text: Optional[Path], tokens: int, window: int, stride: Optional[int],
                out: Path, speed: bool) -> list[dict]:
    """The body of ``compare`` (and of the demo's first half): rows, table, plot and JSON."""
    from lowbit.compare import compare
    from lowbit.eval.speed import machine
    from lowbit.report import compare_table, plot_tradeoff, write_json

    body, text_name = _text(text)
    base, tok = _load(model)
    rows = compare(base, tok, methods, body, tokens, window, stride, with_speed=speed)
    out.mkdir(parents=True, exist_ok=True)
    protocol = _protocol(tokens, window, stride, text_name)
    title = f"{model}: {protocol}"
    console.print(compare_table(rows, title))
    console.print(f"speeds: {SPEED_PROTOCOL}, on {machine()}")
    plot_tradeoff(rows, out / "tradeoff.png", f"{model}, {text_name}, {tokens} tokens")
    write_json({"model": model, "protocol": protocol, "machine": machine(), "rows": rows}, out / "compare.json")
    console.print(f"written: {out / 'compare.json'}, {out / 'tradeoff.png'}")
    return rows


@app.command("compare")
@friendly
def compare_cmd(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    methods: str = typer.Option(",".join(("fp32", "bf16", "int8", "int8-zp", "int8-weight", "nf4", "fp4", "int4", "ternary")),
                                help="comma-separated methods; also rtn3, rtn4, gptq3, gptq4, spqr3, spqr4"),
    text: Optional[Path] = typer.Option(None, help=TEXT_HELP),
    tokens: int = typer.Option(8192, help="tokens of the text to score"),
    window: int = typer.Option(512, help="tokens per window"),
    stride: Optional[int] = typer.Option(None, help="sliding-window stride (default: non-overlapping windows)"),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="measure prefill and decode tokens/s"),
    out: Path = typer.Option(Path("lowbit-compare"), "--out", "-o", help="folder for compare.json and tradeoff.png"),
) -> None:
    """Quantize MODEL by each method and compare bits/param, size, perplexity and speed in one table, a plot and JSON.

    Example: lowbit compare smollm2-135m --methods fp32,int8,nf4,ternary --tokens 4096
    """
    _setup()
    run_compare(model, _methods(methods), text, tokens, window, stride, out, speed)


def run_outliers(model: str, threshold: float, text: Optional[Path], tokens: int, out: Path, ablation: bool) -> dict:
    from lowbit.analysis.study import outlier_study
    from lowbit.report import outlier_table, plot_outlier_heatmap, write_json

    body, text_name = _text(text)
    m, tok = _load(model, encoders=True)
    report, summary = outlier_study(m, tok, body, tokens, threshold, ablation)
    summary.update(model=model, text=text_name)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(model).name.replace(".", "-") or "model"
    console.print(outlier_table(summary, f"{model}: outlier features (|x| >= {threshold:g}, >= 25% of layers, >= 6% of "
                                         f"positions) over {summary['positions']} positions of {text_name}"))
    console.print(f"{summary['outlier_features']} dimension(s) meet the criteria, in {summary['layers_with_outlier_features']} "
                  f"of {summary['layers']} layers; {summary['dims_reaching_threshold']} of {summary['width']} dimensions "
                  f"reach |x| >= {threshold:g} somewhere.")
    ab = summary.get("ablation")
    if ab:
        console.print(f"ablation ({ab['metric']}): baseline {ab['baseline']:.4g}; outlier dims {ab['dims']} zeroed "
                      f"{ab['outliers_zeroed']:.4g}; {len(ab['random_dims'])} random dims {ab['random_dims']} zeroed "
                      f"{ab['random_zeroed']:.4g}")
    plot_outlier_heatmap(report, out / f"outliers-{stem}.png", f"{model}: max |x| of the hidden-width linear inputs")
    write_json(summary, out / f"outliers-{stem}.json")
    console.print(f"written: {out / f'outliers-{stem}.json'}, {out / f'outliers-{stem}.png'}")
    summary["heatmap"] = f"outliers-{stem}.png"
    return summary


@app.command()
@friendly
def outliers(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP + ", or all-minilm-l6-v2 (bundled encoder)"),
    threshold: float = typer.Option(6.0, help="magnitude that makes an outlier"),
    text: Optional[Path] = typer.Option(None, help=TEXT_HELP),
    tokens: int = typer.Option(2048, help="tokens to run through the model"),
    ablation: bool = typer.Option(True, "--ablation/--no-ablation", help="zero the features vs as many random dimensions"),
    out: Path = typer.Option(Path("lowbit-outliers"), "--out", "-o", help="folder for the heatmap and JSON"),
) -> None:
    """Find the emergent outlier features of LLM.int8() in MODEL, with a heatmap and the zeroing ablation.

    Example: lowbit outliers smollm2-135m --tokens 2048     (or: lowbit outliers all-minilm-l6-v2)
    """
    _setup()
    if threshold <= 0 or tokens < 2:
        raise UserError("--threshold must be > 0 and --tokens >= 2")
    run_outliers(model, threshold, text, tokens, out, ablation)


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("lowbit-report"), "--out", "-o", help="folder for the report"),
    tokens: int = typer.Option(4096, help="tokens of the bundled text to score per method (8192: the full protocol)"),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="measure prefill and decode tokens/s"),
) -> None:
    """The main job: compare every method on the bundled SmolLM2-135M, find its outlier features, write a report.

    Example: lowbit demo      (writes ./lowbit-report/README.md with the table and plots)
    """
    _setup()
    from lowbit.eval.speed import machine
    from lowbit.methods import DEFAULT_COMPARE
    from lowbit.report import write_report

    t = time.perf_counter()
    rows = run_compare("smollm2-135m", list(DEFAULT_COMPARE), None, tokens, 512, None, out, speed)
    lm = run_outliers("smollm2-135m", 6.0, None, 2048, out, True)
    enc = run_outliers("all-minilm-l6-v2", 6.0, None, 2048, out, True)
    path = write_report(out, rows, [lm, enc], _protocol(tokens, 512, None, "python-tutorial.txt (bundled)"), machine(),
                        time.perf_counter() - t, SPEED_PROTOCOL)
    console.print(f"[green]report:[/] {path}  ({time.perf_counter() - t:.0f} s)")


@app.command()
@friendly
def doctor(
    build: bool = typer.Option(False, "--build", help="also build (about a minute each) and check every kernel build this CPU runs"),
) -> None:
    """Show this machine's CPU, the features that choose lowbit's paths, and the paths that will run.

    Example: lowbit doctor      (paste its output into a bug report or beside a benchmark)
    """
    _setup()
    import platform

    import torch
    from rich.table import Table

    from lowbit import __version__, kernels
    from lowbit.kernels import cpu, cpu_ext

    console.print(f"lowbit {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
                  f"{torch.get_num_threads()} threads")
    console.print(f"CPU: {cpu.cpu_model()} ({platform.machine()})")
    decides = {"avx512f": "kernel build avx512*", "avx512bw": "kernel build avx512*",
               "avx512_vnni": "kernel build avx512_vnni (int8/ternary dot products)",
               "avx512_bf16": "bf16 prefill GEMMs; bitsandbytes' fused 4-bit kernel",
               "amx_bf16": "bf16 prefill GEMMs (torch's AMX GEMM)", "amx_int8": "torch's int8 GEMMs (AMX)",
               "amx_tile": "AMX", "avx2": "", "fma": "", "f16c": "", "avx512vl": "", "avx512dq": ""}
    table = Table("feature", "present", "decides")
    for f in cpu.DECIDING:
        table.add_row(f, "yes" if f in cpu.cpu_flags() else "no", decides.get(f, ""))
    console.print(table)
    builds = Table("kernel build", "this CPU runs it", "built", "selected")
    for v in cpu_ext.variants():
        ok = cpu_ext.supported(v)
        built = cpu_ext.is_built(v)
        if build and ok:
            module = cpu_ext.load(v)
            built = module is not None and module.compiled_isa() == v
        builds.add_row(v, "yes" if ok else "no", "yes" if built else "no", "<-" if kernels.kernel_path() == v else "")
    console.print(builds)
    console.print(f"paths now: {kernels.describe()} "
                  "(force with LOWBIT_KERNELS=avx512_vnni|avx512|scalar|reference, LOWBIT_GEMM=bf16|fp32)")
    try:
        import bitsandbytes as bnb

        fused = bnb.functional.has_avx512bf16()
        console.print(f"bitsandbytes {bnb.__version__}: eval-mode 4-bit layers run "
                      + ("its fused bf16 kernel (AVX512_BF16)" if fused else "dequantize + matmul (no AVX512_BF16)"))
    except ImportError:
        console.print("bitsandbytes: not installed")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
