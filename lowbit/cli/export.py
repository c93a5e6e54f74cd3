"""lowbit export: a model (or a lowbit checkpoint) as a GGUF file for llama.cpp, or a compressed-tensors folder
for vLLM."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import (MODEL_HELP, THREADS_HELP, UserError, app, apply_plan, calibration_ids, check_writable_dir,
                               check_writable_file, console, friendly, load, out_path, read_plan,
                               rotate_model, setup, use_threads)

FORMATS = ("gguf", "compressed-tensors")
TYPE_HELP = ("gguf: f32 | f16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | iq4_nl | q4_k | q6_k | tq2_0 (the type of every "
             "linear weight a --plan does not set); compressed-tensors: int4 | int8 (weight-only, groups of --group-size)")


@app.command()
@friendly
def export(
    model: str = typer.Argument(..., help=MODEL_HELP),
    format: str = typer.Option("gguf", "--format", "-f", help="gguf (llama.cpp, Ollama) or compressed-tensors (vLLM)"),
    type: str = typer.Option(..., "--type", "-t", help=TYPE_HELP),
    out_arg: str = typer.Option(..., "--out", "-o", metavar="PATH",
                                help="the .gguf file, or the compressed-tensors folder"),
    method: Optional[str] = typer.Option(None, "--method", "-m",
                                         help="quantize first: gptq (gguf: GPTQ onto --type's own grid, calibrated "
                                              "codes the file holds as they are), ternary before tq2_0, ..."),
    plan: Optional[Path] = typer.Option(None, help="gguf: a per-tensor plan (from lowbit advise --gguf): each "
                                        "weight in its own type, one mixed file"),
    calib_text: Optional[Path] = typer.Option(None, help="calibration text of gptq / a plan's gptq layers (default: "
                                              "the bundled text past its first 8192 tokens)"),
    group_size: Optional[int] = typer.Option(None, help="compressed-tensors: weights per scale (default: 128, or the "
                                             "largest of 64 and 32 that divides every layer's inputs); --method "
                                             "rtn / gptq quantize with it"),
    rotate: bool = typer.Option(False, "--rotate", help="fold a random Hadamard rotation into the residual stream "
                                "before quantizing (an ordinary GGUF that computes the same function, rounded with "
                                "less error; a tied head is written untied)"),
    force_ternary: bool = typer.Option(False, "--force-ternary", help="tq2_0 of a model that is not ternary: round it"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Write MODEL as a GGUF file that llama.cpp runs, or as a compressed-tensors folder that vLLM serves.

    Example: lowbit export smollm2-135m --type q4_1 --out smollm2.gguf   (the bundled GGUF's own Q4_1 codes, bit for bit)
             lowbit export smollm2-135m --type q4_0 --method gptq --out smollm2-q4_0.gguf   (GPTQ on Q4_0's grid)
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
    block_types = ()
    if format == "gguf":
        from lowbit.nn.ggml import BLOCK_TYPES as block_types
    if method is not None and type in block_types and method in ("gptq", "rtn"):
        method = f"gptq-{type}" if method == "gptq" else type  # GPTQ / rounding onto the type's own grid
    elif method is not None and type in block_types and method not in (*block_types, *LOADED) \
            and not method.startswith("gptq-"):  # a block type's layers go out in their own type
        console.print(f"[yellow]note:[/] --method {method} quantizes to its own format; the file then rounds those "
                      f"weights again onto {type}'s grid (--method gptq chooses codes on {type}'s grid itself)")
    if method is not None:
        check_method(method)
    if rotate and method in LOADED:
        raise UserError("--rotate changes the weights: it cannot keep a GGUF's own codes (--method native)")
    the_plan = read_plan(plan, method, None, {})
    if the_plan is not None and format != "gguf":
        raise UserError("--plan writes mixed GGUF files: use it with --format gguf")
    if calib_text is not None and not calib_text.is_file():
        raise UserError(f"--calib-text {calib_text} is not a file")
    use_threads(threads)
    # the file's own codes, where nothing is done to them
    native = format == "gguf" and _is_gguf(model) and method in (None, *LOADED) and not rotate and the_plan is None
    m, tok = load(model, native=native)
    if rotate:
        rotate_model(m)
    grouped = format == "compressed-tensors"
    if grouped:
        from lowbit.interop.compressed_tensors import group_size_for

        group_size = group_size or group_size_for(m)
    if the_plan is not None:
        apply_plan(m, tok, the_plan, calib_text, model)
    elif method is not None and method not in LOADED:
        calibration = calibration_ids(tok, calib_text) if needs_calibration(method) else None
        # rtn / gptq for compressed-tensors: groups of the size written, so that the layers go out as they are
        same_groups = grouped and method.startswith(("rtn", "gptq"))
        bits = int(type[3:]) if same_groups and not method[-1].isdigit() else None
        apply_method(m, method, calibration=calibration, blocksize=group_size if same_groups else None, bits=bits)
    if format == "gguf":
        from lowbit.interop.gguf_export import export_gguf

        r = export_gguf(m, tok, out, type, force_ternary=force_ternary)
        console.print(f"[green]written[/] {out}: {type}, {r['bytes'] / 1e6:.1f} MB, {r['tensors']} tensors "
                      f"({r['from_codes']} linear weights in their own lowbit codes, {r['quantized']} "
                      f"rounded onto their type's grid (ggml's reference rounding; K types by lowbit's search), "
                      f"the embeddings in q8_0 among them, {r['float']} float)")
        if r.get("types"):
            mix = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items()))
            from lowbit.nn.ggml import K_FALLBACK

            why = (f" ({K_FALLBACK[type]} is llama.cpp's type for rows that {type}'s 256-weight super-blocks do not tile)"
                   if K_FALLBACK.get(type) in r["types"] else "")
            console.print(f"mixed: {mix} weight(s) in a type other than {type}{why}")
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
