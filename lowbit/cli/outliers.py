"""lowbit outliers: the emergent outlier features of LLM.int8(), with a heatmap and an ablation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import (THREADS_HELP, check_writable_dir, use_threads, app, friendly, MODEL_HELP, TEXT_HELP,
                               UserError, console, load, print_signs, read_text, setup, out_path)


def run_outliers(model: str, threshold: float, text: Optional[Path], tokens: int, out: Path, ablation: bool) -> dict:
    from lowbit.analysis.hard_case import activation_signs
    from lowbit.analysis.study import outlier_study
    from lowbit.app.report import advisor_hint, outlier_table, plot_outlier_heatmap, write_json

    body, text_name = read_text(text)
    m, tok = load(model, encoders=True)
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
    summary["hard_case"] = [sign.to_dict() for sign in activation_signs(summary)]
    summary["causal_lm"] = bool(getattr(m, "can_generate", lambda: False)())  # encoders load here too
    print_signs(summary["hard_case"], f"largest |x| {summary['max_abs']:.1f}",
                advisor_hint(model) if summary["causal_lm"] else None)
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
    out_arg: str = typer.Option("lowbit-outliers", "--out", "-o", metavar="PATH",
                                help="folder for the heatmap and JSON"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Find the emergent outlier features of LLM.int8() in MODEL, with a heatmap and the zeroing ablation.

    Example: lowbit outliers smollm2-135m --tokens 2048     (or: lowbit outliers all-minilm-l6-v2)
    """
    setup()
    out = out_path(out_arg)
    if threshold <= 0 or tokens < 2:
        raise UserError("--threshold must be > 0 and --tokens >= 2")
    check_writable_dir(out)
    use_threads(threads)
    run_outliers(model, threshold, text, tokens, out, ablation)
