"""lowbit eval: perplexity, speed and memory of one model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import (THREADS_HELP, app, check_scoring, check_writable_file, friendly, MODEL_HELP, SPEED_PROTOCOL,
                               TEXT_HELP, UserError, console, load, describe_protocol, print_signs, read_text, setup, use_threads, ensure_kernels)


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
    adapter: Optional[Path] = typer.Option(None, help="a PEFT LoRA adapter folder (from lowbit finetune) to apply"),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="for an unquantized model: also score 8- and 4-bit "
                               "round-to-nearest copies on up to 2048 tokens, and say if it looks hard to quantize"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Perplexity, prefill/decode speed and memory of MODEL (a checkpoint folder or a model to quantize on the fly).

    Example: lowbit eval smollm2-nf4 --tokens 4096     (or: lowbit eval smollm2-135m --method int8)
             lowbit eval smollm2-135m --method native   (the bundled GGUF's own Q4_1 weights)
    """
    setup()
    from lowbit.analysis.hard_case import degradation_signs
    from lowbit.app.report import advisor_hint
    from lowbit.app.compare import bit_probe, linear_bits_per_param, measure
    from lowbit.eval.speed import machine
    from lowbit.app.methods import LOADED, apply_method, check_method, needs_calibration

    check_method(method)
    check_scoring(tokens, window, stride)
    if json_out is not None:
        check_writable_file(json_out, "--json")
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    body, text_name = read_text(text)
    use_threads(threads)
    ensure_kernels()
    native = method in LOADED
    m, tok = load(model, native=native)
    label = method if method != "fp32" else _loaded_label(m)
    if method != "fp32" and not native:
        calibration = None
        if needs_calibration(method):
            from lowbit.calibrate import calibration_batches

            calibration = calibration_batches(tok, body, skip_tokens=max(tokens, 8192))
        apply_method(m, method, calibration=calibration)
    if adapter is not None:
        m = _with_adapter(m, adapter)
    row = measure(m, tok, body, tokens, window, stride, with_speed=speed)
    row.update(model=model, method=label, protocol=describe_protocol(row["tokens"], window, stride, text_name),
               machine=machine())
    console.print(f"[bold]{model}[/] ({label}): perplexity [bold]{row['perplexity']:.3f}[/]  ({row['protocol']})")
    console.print(f"memory {row['model_mb']:.1f} MB, {row['bits_per_param_model']:.2f} bits/param (model), "
                  f"{linear_bits_per_param(m):.3f} bits/param (linear layers)")
    if speed:
        console.print(f"prefill {row['prefill_tok_s']:.0f} tok/s, decode {row['decode_tok_s']:.1f} tok/s ({SPEED_PROTOCOL}) "
                      f"on {row['machine']}")
    if probe and method == "fp32" and adapter is None and label in ("fp32", "bf16", "fp16"):
        same = row["tokens"] <= 2048 and stride in (None, window)  # the probe's protocol: its base is scored
        p = bit_probe(m, tok, body, min(row["tokens"], 2048), window, base=row["perplexity"] if same else None)
        signs = [s.to_dict() for s in degradation_signs(p["ratio8"], p["ratio4"])]
        row["probe"] = {**p, "hard_case": signs}
        print_signs(signs, f"8-bit round-to-nearest {p['ratio8'] - 1:+.2%}, 4-bit {p['ratio4'] - 1:+.1%} perplexity "
                           f"on {p['tokens']} tokens", advisor_hint(model))
    if json_out:
        json_out.write_text(json.dumps(row, indent=1, default=str))


def _loaded_label(model) -> str:
    """What a model loaded as it is holds: "fp32", "bf16", or a checkpoint's quantization ("nf4 checkpoint")."""
    config = getattr(model, "lowbit_config", None)
    if config is not None:
        d = config.to_dict()
        name = d.get("quant_type") if d["method"] == "4bit" else d["method"]
        return f"{name} checkpoint"
    from lowbit.nn import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if layers:  # quantized without a model-wide config: trained as b1.58, or built layer by layer
        if all(getattr(m, "input_norm", False) for m in layers):
            return "b1.58-trained"
        return "/".join(sorted({type(m).__name__ for m in layers}))
    dtype = next(model.parameters()).dtype
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), "fp32")


def _with_adapter(model, adapter: Path):
    """``model`` with the PEFT adapter in ``adapter`` applied; an adapter of another model is one error line."""
    import peft

    import lowbit.train  # noqa: F401 - PEFT wraps lowbit layers

    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        return peft.PeftModel.from_pretrained(model, adapter).eval()
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatches, unknown target modules
        raise UserError(f"the adapter in {adapter} does not fit this model: {str(e).strip().splitlines()[0]}") from None
