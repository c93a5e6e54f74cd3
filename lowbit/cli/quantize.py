"""lowbit quantize: quantize a model and save it as a lowbit checkpoint."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import (THREADS_HELP, apply_plan, calibration_ids, read_plan, rotate_model, app, friendly, first_line,
                               MODEL_HELP, UserError, console, load, setup,
                               use_threads, ensure_kernels, out_path)


@app.command()
@friendly
def quantize(
    model: str = typer.Argument(..., help=MODEL_HELP),
    method: Optional[str] = typer.Option(None, "--method", "-m",
                                         help="a method: nf4 (default), int8, gptq3, bf16, ... (`lowbit methods` lists "
                                              "them all)"),
    plan: Optional[Path] = typer.Option(None, help="a per-layer plan (JSON, from lowbit advise) instead of --method"),
    embeddings: Optional[str] = typer.Option(None, help="the token embeddings (and a head tied to them): float32 "
                                                        "(default: kept), bfloat16, int8 or int4 rows"),
    bits: Optional[int] = typer.Option(None, help="bits of rtn / gptq / spqr (2, 3, 4 or 8; default 4, spqr 3)"),
    calib_text: Optional[Path] = typer.Option(None, help="calibration text of gptq / spqr (default: the bundled text past its first 8192 tokens)"),
    out_arg: str = typer.Option(..., "--out", "-o", metavar="PATH", help="folder for the lowbit checkpoint"),
    blocksize: Optional[int] = typer.Option(None, help="block / group size (nf4, fp4, int4: 64; rtn, gptq: 128; spqr: 16)"),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant", help="quantize the 4-bit absmax too"),
    threshold: Optional[float] = typer.Option(None, help="LLM.int8 outlier threshold (default 6.0; 0 turns it off)"),
    max_shard_size: str = typer.Option("2GB", help="largest safetensors shard"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    rotate: bool = typer.Option(False, "--rotate", help="fold a random Hadamard rotation into the residual stream "
                                "first (same function, outliers spread: every format rounds with less error; a tied "
                                "head is untied)"),
    stream: bool = typer.Option(True, "--stream/--in-memory",
                                help="for a transformers folder: read, quantize and write one tensor at a time (the "
                                     "full-precision model is never built; same output as --in-memory)"),
) -> None:
    """Quantize MODEL and save it (with its tokenizer) as a lowbit checkpoint.

    A transformers folder with safetensors weights is quantized streamed, tensor by tensor (GPTQ and SpQR block by
    block): peak memory is about the largest tensor, not the model.

    Example: lowbit quantize smollm2-135m --method nf4 --out smollm2-nf4
    """
    setup()
    out = out_path(out_arg)
    import lowbit
    from lowbit.app.methods import LOADED, apply_method, check_method, method_config, needs_calibration
    from lowbit.app.models import streamable
    from lowbit.checkpoint import check_target, parse_size
    from lowbit.nn.embedding import EMBEDDING_FORMATS

    # Everything that can be checked is checked before the model loads (GPTQ can take minutes).
    if embeddings is not None and embeddings not in EMBEDDING_FORMATS:
        raise UserError(f"--embeddings must be one of {', '.join(EMBEDDING_FORMATS)}, got {embeddings!r}")
    the_plan = read_plan(plan, method, embeddings, dict(bits=bits, blocksize=blocksize, double_quant=double_quant,
                                                          threshold=threshold))
    method = method or "nf4"
    check_method(method)
    if method == "fp32":
        raise UserError("fp32 is the unquantized model: choose a method such as nf4 or int8")
    if bits is not None and bits not in (2, 3, 4, 8):
        raise UserError(f"--bits must be 2, 3, 4 or 8, got {bits}")
    options = dict(blocksize=blocksize, double_quant=double_quant, threshold=threshold, bits=bits)
    method_config(method, **options)  # options that do not apply, or out of range
    try:
        if parse_size(max_shard_size) <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"--max-shard-size must be a size such as 2GB or 500MB, got {max_shard_size!r}") from None
    check_target(out)
    if calib_text is not None and not calib_text.is_file():
        raise UserError(f"--calib-text {calib_text} is not a file")
    use_threads(threads)
    ensure_kernels()  # a first-run build is not part of "quantized in N s"
    native = method in LOADED
    if native:
        from lowbit.app.models import gguf_of

        gguf_of(model)  # a model that is no GGUF: said now, before anything loads
    if rotate and native:
        raise UserError("--rotate changes the weights: it cannot keep a GGUF's own codes (--method native)")
    if the_plan is not None:
        return _quantize_by_plan(model, the_plan, calib_text, out, max_shard_size, rotate)
    if stream and not rotate and not native and method != "bf16" and embeddings in (None, "float32") and streamable(model):
        return _quantize_streamed(Path(model), method, options, calib_text, out, max_shard_size)
    t = time.perf_counter()
    m, tok = load(model, native=native, tokenizer=needs_calibration(method))  # as streamed: saved if there is one
    if rotate:
        rotate_model(m)
    calibration = calibration_ids(tok, calib_text) if needs_calibration(method) else None
    if not native:  # native: the load is the quantization (the file's own codes)
        t = time.perf_counter()
        apply_method(m, method, calibration=calibration, **options)
    if embeddings is not None:
        from lowbit.embeddings import quantize_embeddings

        quantize_embeddings(m, embeddings)
    seconds = time.perf_counter() - t
    lowbit.save(m, out, tokenizer=tok, max_shard_size=max_shard_size)
    r = lowbit.memory_report(m)
    console.print(f"[green]saved[/] {out}: {method}, {r['total_bytes'] / 1e6:.1f} MB "
                  f"({r['bits_per_param']:.2f} bits/param over the whole model; fp32 {r['fp32_bytes'] / 1e6:.1f} MB), "
                  f"quantized in {seconds:.1f} s")


def _quantize_by_plan(model: str, plan, calib_text: Optional[Path], out: Path, max_shard_size: str,
                      rotate: bool = False) -> None:
    import lowbit

    m, tok = load(model, tokenizer=plan.needs_calibration())
    if rotate:
        rotate_model(m)
    t = time.perf_counter()
    apply_plan(m, tok, plan, calib_text, model)
    seconds = time.perf_counter() - t
    lowbit.save(m, out, tokenizer=tok, max_shard_size=max_shard_size)
    from lowbit.app.compare import linear_bits_per_param

    r = lowbit.memory_report(m)
    console.print(f"[green]saved[/] {out}: plan of {len(plan.layers)} layers, {r['total_bytes'] / 1e6:.1f} MB "
                  f"({linear_bits_per_param(m):.3f} bits/param over the linear layers), quantized in {seconds:.1f} s")


def _quantize_streamed(src: Path, method: str, options: dict, calib_text: Optional[Path], out: Path,
                       max_shard_size: str) -> None:
    from transformers import AutoTokenizer

    from lowbit.app.methods import method_config, needs_calibration
    from lowbit.checkpoint import is_hf_lowbit_folder
    from lowbit.stream import quantize_checkpoint

    if is_hf_lowbit_folder(src):
        raise UserError(f"{src} is quantized by lowbit already: quantize the full-precision model")
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError):
        tok = None
    calibration = None
    if needs_calibration(method):
        if tok is None:
            raise UserError(f"{src} holds no tokenizer to make {method}'s calibration data with")
        calibration = calibration_ids(tok, calib_text)
    config = method_config(method, **options)
    try:
        stats = quantize_checkpoint(src, out, config, calibration=calibration, tokenizer=tok,
                                    max_shard_size=max_shard_size)
    except NotImplementedError as e:  # an architecture the streamed GPTQ / SpQR cannot walk
        raise UserError(f"{first_line(e)} (or pass --in-memory)") from None
    gb = stats["source_bytes"] / 1e9
    console.print(f"[green]saved[/] {out}: {method}, {stats['written_bytes'] / 1e6:.1f} MB from {gb:.2f} GB "
                  f"streamed in {stats['seconds']:.1f} s ({stats['source_bytes'] / stats['seconds'] / 1e6:.0f} MB/s of input); "
                  f"peak RSS {stats['peak_rss_bytes'] / 1e9:.2f} GB")

