"""lowbit compare: every method on one model, in one table, a plot and JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import (THREADS_HELP, app, check_scoring, check_writable_dir, friendly, MODEL_HELP, SPEED_PROTOCOL,
                               TEXT_HELP, console, load, parse_methods, describe_protocol, read_text, setup, use_threads, out_path)


def run_compare(model: str, methods: list[str], text: Optional[Path], tokens: int, window: int, stride: Optional[int],
                out: Path, speed: bool) -> list[dict]:
    """The body of ``compare`` (and of the demo's first half): rows, table, plot and JSON."""
    from lowbit.app.compare import compare
    from lowbit.eval.speed import machine
    from lowbit.app.report import compare_table, plot_tradeoff, write_json

    body, text_name = read_text(text)
    base, tok = load(model)
    native = (lambda: load(model, native=True)[0]) if "native" in methods else None
    rows = compare(base, tok, methods, body, tokens, window, stride, with_speed=speed, native=native)
    out.mkdir(parents=True, exist_ok=True)
    protocol = describe_protocol(rows[0].get("tokens", tokens) if rows else tokens, window, stride, text_name)
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
    methods: Optional[str] = typer.Option(
        None, help="comma-separated methods (default: fp32, bf16 and the uncalibrated formats, "
                   "lowbit.app.methods.DEFAULT_COMPARE; `lowbit methods` lists them all)"),
    text: Optional[Path] = typer.Option(None, help=TEXT_HELP),
    tokens: int = typer.Option(8192, help="tokens of the text to score"),
    window: int = typer.Option(512, help="tokens per window"),
    stride: Optional[int] = typer.Option(None, help="sliding-window stride (default: non-overlapping windows)"),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="measure prefill and decode tokens/s"),
    out_arg: str = typer.Option("lowbit-compare", "--out", "-o", metavar="PATH",
                                help="folder for compare.json and tradeoff.png"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Quantize MODEL by each method and compare bits/param, size, perplexity and speed in one table, a plot and JSON.

    Example: lowbit compare smollm2-135m --methods fp32,int8,nf4,ternary --tokens 4096
    """
    setup()
    out = out_path(out_arg)
    from lowbit.app.methods import DEFAULT_COMPARE

    names = parse_methods(methods) if methods is not None else list(DEFAULT_COMPARE)
    check_scoring(tokens, window, stride)
    check_writable_dir(out)
    use_threads(threads)
    run_compare(model, names, text, tokens, window, stride, out, speed)
