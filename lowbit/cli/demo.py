"""lowbit demo: the main job, every method on the bundled model and its outlier features, as a report."""
from __future__ import annotations

import time
from typing import Optional

import typer

from lowbit.cli.common import THREADS_HELP, check_scoring, check_writable_dir, use_threads, app, friendly, SPEED_PROTOCOL, console, describe_protocol, setup, out_path
from lowbit.cli.compare import run_compare
from lowbit.cli.outliers import run_outliers


@app.command()
@friendly
def demo(
    out_arg: str = typer.Option("lowbit-report", "--out", "-o", metavar="PATH", help="folder for the report"),
    tokens: int = typer.Option(4096, help="tokens of the bundled text to score per method (8192: the full protocol)"),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="measure prefill and decode tokens/s"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """The main job: compare every method on the bundled SmolLM2-135M, advise per-layer formats, find its outlier
    features, write a report.

    Example: lowbit demo      (writes ./lowbit-report/README.md with the table and plots)
    """
    setup()
    out = out_path(out_arg)
    from lowbit.eval.speed import machine
    from lowbit.app.methods import DEFAULT_COMPARE
    from lowbit.app.report import write_report

    check_scoring(tokens, 512, None)
    check_writable_dir(out)
    use_threads(threads)
    t = time.perf_counter()
    rows = run_compare("smollm2-135m", list(DEFAULT_COMPARE), None, tokens, 512, None, out, speed)
    from lowbit.cli.advise import run_advisor

    advisor = run_advisor("smollm2-135m", tokens, out, rows)
    lm = run_outliers("smollm2-135m", 6.0, None, 2048, out, True)
    enc = run_outliers("all-minilm-l6-v2", 6.0, None, 2048, out, True)
    path = write_report(out, rows, [lm, enc], describe_protocol(tokens, 512, None, "python-tutorial.txt (bundled)"), machine(),
                        time.perf_counter() - t, SPEED_PROTOCOL, advisor)
    console.print(f"[green]report:[/] {path}  ({time.perf_counter() - t:.0f} s)")
