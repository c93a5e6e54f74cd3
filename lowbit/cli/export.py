"""lowbit export: a model (or a lowbit checkpoint) as a GGUF file for llama.cpp, or a compressed-tensors folder
for vLLM."""
from __future__ import annotations

from typing import Optional

import typer

from lowbit.cli.common import (MODEL_HELP, THREADS_HELP, UserError, app, check_writable_dir, check_writable_file,
                               console, friendly, load, setup, use_threads, out_path)

FORMATS = ("gguf", "compressed-tensors")
TYPE_HELP = ("gguf: f16 | q8_0 | q4_0 | q4_1 | tq2_0; compressed-tensors: int4 | int8 (weight-only, groups of "
             "--group-size)")


@app.command()
@friendly
def export(
    model: str = typer.Argument(..., help=MODEL_HELP),
    format: str = typer.Option("gguf", "--format", "-f", help="gguf (llama.cpp, Ollama) or compressed-tensors (vLLM)"),
    type: str = typer.Option(..., "--type", "-t", help=TYPE_HELP),
    out_arg: str = typer.Option(..., "--out", "-o", metavar="PATH",
                                help="the .gguf file, or the compressed-tensors folder"),
    method: Optional[str] = typer.Option(None, "--method", "-m",
                                         help="quantize first (e.g. ternary before tq2_0, gptq before int4)"),
    group_size: Optional[int] = typer.Option(None, help="compressed-tensors: weights per scale (default: 128, or the "
                                             "largest of 64 and 32 that divides every layer's inputs); --method "
                                             "rtn / gptq quantize with it"),
    force_ternary: bool = typer.Option(False, "--force-ternary", help="tq2_0 of a model that is not ternary: round it"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Write MODEL as a GGUF file that llama.cpp runs, or as a compressed-tensors folder that vLLM serves.

    Example: lowbit export smollm2-135m --type q4_1 --out smollm2.gguf   (the bundled GGUF's own Q4_1 codes, bit for bit)
             lowbit export smollm2-135m --format compressed-tensors --type int4 --method gptq --out smollm2-ct
    """
    setup()
    out = out_path(out_arg)
    from lowbit.app.methods import LOADED, apply_method, check_method, needs_calibration

    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "gguf":
        from lowbit.interop.gguf_export import TYPES

        if type not in TYPES:
            raise UserError(f"--type for gguf must be one of {', '.join(TYPES)}, got {type!r}")
        if out.exists():
            raise UserError(f"--out {out} exists: choose a new file name")
        check_writable_file(out, "--out")
    else:
        from lowbit.interop.compressed_tensors import TYPES as CT_TYPES

        if type not in CT_TYPES:
            raise UserError(f"--type for compressed-tensors must be one of {', '.join(CT_TYPES)}, got {type!r}")
        if out.exists():
            raise UserError(f"--out {out} exists: choose a new folder")
        check_writable_dir(out)
    if method is not None:
        check_method(method)
    use_threads(threads)
    native = format == "gguf" and _is_gguf(model) and method in (None, *LOADED)  # keep the file's own codes
    m, tok = load(model, native=native)
    grouped = format == "compressed-tensors"
    if grouped:
        from lowbit.interop.compressed_tensors import group_size_for

        group_size = group_size or group_size_for(m)
    if method is not None and method not in LOADED:
        calibration = None
        if needs_calibration(method):
            from lowbit.calibrate import calibration_batches
            from lowbit.data import default_text

            calibration = calibration_batches(tok, default_text(), skip_tokens=8192)
        # rtn / gptq for compressed-tensors: groups of the size written, so that the layers go out as they are
        same_groups = grouped and method.startswith(("rtn", "gptq"))
        bits = int(type[3:]) if same_groups and not method[-1].isdigit() else None
        apply_method(m, method, calibration=calibration, blocksize=group_size if same_groups else None, bits=bits)
    if format == "gguf":
        from lowbit.interop.gguf_export import export_gguf

        r = export_gguf(m, tok, out, type, force_ternary=force_ternary)
        console.print(f"[green]written[/] {out}: {type}, {r['bytes'] / 1e6:.1f} MB, {r['tensors']} tensors "
                      f"({r['from_codes']} linear weights from their own lowbit codes bit for bit, {r['quantized']} "
                      f"quantized by gguf, {r['float']} float)")
        if r.get("fallback"):
            console.print(f"[yellow]note:[/] {len(r['fallback'])} weight(s) have rows that {type} blocks do not tile "
                          f"and went out as {r['fallback'][0].rsplit('(', 1)[1][:-1]} (as llama.cpp's quantizer does), "
                          f"e.g. {r['fallback'][0]}")
        console.print(f"run it: llama-cli -m {out} -p 'The capital of France is'   (or llama_cpp.Llama(model_path=...))")
    else:
        from lowbit.interop.compressed_tensors import export_compressed_tensors

        r = export_compressed_tensors(m, tok, out, type, group_size)
        console.print(f"[green]written[/] {out}: compressed-tensors {type} pack-quantized, group size {group_size}, "
                      f"{r['layers']} layers ({r['from_codes']} from their own lowbit codes), {r['bytes'] / 1e6:.1f} MB")
        console.print(f"serve it: vllm serve {out}   (transformers: AutoModelForCausalLM.from_pretrained('{out}'))")


def _is_gguf(spec: str) -> bool:
    from lowbit.app.models import gguf_of

    try:
        gguf_of(spec)
        return True
    except ValueError:
        return False
