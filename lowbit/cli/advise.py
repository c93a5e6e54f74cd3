"""lowbit advise: the per-layer formats of least predicted loss that fit a size budget, as a plan to quantize by."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import (THREADS_HELP, MODEL_HELP, TEXT_HELP, UserError, app, check_scoring, check_writable_file,
                               console, friendly, load, read_text, setup, use_threads, out_path)


@app.command()
@friendly
def advise(
    model: str = typer.Argument("smollm2-135m", help=MODEL_HELP),
    bits: Optional[float] = typer.Option(None, help="budget: bits per weight averaged over the blocks' linear layers"),
    budget: Optional[str] = typer.Option(None, help="budget: the whole stored model's size (120MB, 0.1GB); the "
                                                    "embeddings' format is chosen too"),
    cost: str = typer.Option("fisher", help="fisher: Fisher-weighted output error (one backward pass); kl: measured "
                                            "KL to the full model per layer and format (slower, exact)"),
    embeddings: str = typer.Option("float32", help="with --bits: the embeddings' format (float32, bfloat16, int8, int4)"),
    text: Optional[Path] = typer.Option(None, help=TEXT_HELP),
    tokens: int = typer.Option(4096, help="tokens of the text to score; calibration reads the text past them"),
    calib_samples: int = typer.Option(8, help="sequences of the sensitivity measurement"),
    calib_len: int = typer.Option(256, help="tokens per sequence of the sensitivity measurement"),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="quantize by the plan and measure its perplexity"),
    gguf: bool = typer.Option(False, "--gguf", help="choose among llama.cpp's block types (GPTQ onto q8_0, q5_0, "
                              "q4_1, q4_0, iq4_nl) for one mixed GGUF file: lowbit export MODEL --plan PLAN --type "
                              "q4_0 --out F.gguf"),
    out_arg: str = typer.Option("plan.json", "--out", "-o", metavar="PATH",
                                help="the plan (JSON) for lowbit quantize --plan; "
                                     "the frontier plot goes beside it"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Measure how much each layer of MODEL loses in each format, choose the formats of least predicted loss within
    the budget (an exact knapsack), print the plan, and plot the perplexity-vs-size frontier.

    Example: lowbit advise smollm2-135m --bits 4.5 --out plan.json; lowbit quantize smollm2-135m --plan plan.json -o q
    """
    setup()
    out = out_path(out_arg)
    from lowbit.checkpoint import parse_size
    from lowbit.nn.embedding import EMBEDDING_FORMATS

    if (bits is None) == (budget is None):
        raise UserError("give one budget: --bits 4.5 (per linear weight) or --budget 120MB (the whole model)")
    budget_bytes = None
    if budget is not None:
        try:
            budget_bytes = parse_size(budget)
        except ValueError:
            raise UserError(f"--budget must be a size such as 120MB or 0.1GB, got {budget!r}") from None
    if cost not in ("fisher", "kl"):
        raise UserError(f"--cost must be fisher or kl, got {cost!r}")
    if embeddings not in EMBEDDING_FORMATS:
        raise UserError(f"--embeddings must be one of {', '.join(EMBEDDING_FORMATS)}, got {embeddings!r}")
    if gguf and embeddings != "float32":
        raise UserError("--embeddings does not apply with --gguf: the GGUF file holds them in Q8_0")
    if budget is not None and embeddings != "float32":
        raise UserError("--embeddings goes with --bits; with --budget the advisor chooses the embeddings' format")
    check_scoring(tokens, 512, None)
    for value, option in ((calib_samples, "--calib-samples"), (calib_len, "--calib-len")):
        if value < 1:
            raise UserError(f"{option} must be positive, got {value}")
    check_writable_file(out, "--out")
    body, text_name = read_text(text)
    use_threads(threads)
    m, tok = load(model)
    skip = max(tokens, 8192)
    calibration = _calibration(tok, body, calib_samples, calib_len, skip, "--calib-samples/--calib-len")

    from lowbit.app.advisor import GGUF_FORMATS, advise as choose, advise_gguf, bounds
    from lowbit.analysis.sensitivity import FORMATS, measure_sensitivity
    from lowbit.cache import cache_dir

    try:
        sens = measure_sensitivity(m, calibration, GGUF_FORMATS if gguf else FORMATS, kl=cost == "kl",
                                   cache=cache_dir() / "sensitivity")
    except ValueError as e:  # a quantized checkpoint given as MODEL
        raise UserError(f"{model}: {e}") from None
    try:
        if gguf:
            advice = advise_gguf(sens, bits=bits, budget=budget_bytes, cost=cost)
        else:
            advice = choose(sens, bits=bits, budget=budget_bytes, cost=cost, embeddings=embeddings)
    except ValueError as e:
        raise UserError(str(e)) from None
    console.print(_plan_table(advice, sens, f"{model}: plan for {_budget_text(bits, budget_bytes)} ({cost} cost)"))
    console.print(_summary_table(advice))
    advice.plan.notes.update(model=model, text=text_name)
    advice.plan.save(out)

    from lowbit.eval.perplexity import perplexity

    reference = perplexity(m, tok, body, tokens, 512, progress=False)
    predicted = advice.predicted_perplexity(reference)
    line = (f"{advice.bits:.3f} bits/param over linear layers, model {advice.model_bytes / 1e6:.1f} MB; perplexity "
            f"fp32 {reference:.3f}, predicted {predicted:.3f} ({predicted / reference:.4f}x)")
    measured = None
    if measure:
        import lowbit

        gptq_calibration = _calibration(tok, body, 32, 512, skip, "the text (GPTQ / SpQR layers)") \
            if any(f.startswith(("gptq", "spqr")) for f in advice.plan.layers.values()) else None
        q = lowbit.quantize(copy.deepcopy(m), advice.plan, calibration=gptq_calibration)
        measured = perplexity(q, tok, body, tokens, 512, progress=False)
        line += f", measured {measured:.3f} ({measured / reference:.4f}x)"
    console.print(line + f" on the first {tokens} tokens of {text_name}")
    if gguf:  # the frontier plot draws lowbit's own formats, float32 included: no GGUF file holds that choice
        console.print(f"written: {out} (lowbit export {model} --plan {out} --type q4_0 --out FILE.gguf)")
        return
    lo = bounds(sens, cost, embeddings)["min_bits"]
    grid = [b for b in (3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0, 8.5) if b >= lo]
    plot = out.with_name(out.stem + "-frontier.png")
    from lowbit.app.report import plot_frontier

    plot_frontier(sens, grid, cost, embeddings, reference, plot, f"{model}: predicted frontier ({cost} cost)",
                  chosen=(advice.bits, measured) if measured else None)
    console.print(f"written: {out} (lowbit quantize {model} --plan {out} --out DIR), {plot}")


def _calibration(tok, body: str, samples: int, length: int, skip: int, what: str):
    from lowbit.calibrate import calibration_batches

    try:
        return calibration_batches(tok, body, n_samples=samples, seq_len=length, skip_tokens=skip)
    except ValueError as e:
        raise UserError(f"calibration text too short for {what}: {e}") from None


def _budget_text(bits: Optional[float], budget: Optional[int]) -> str:
    return f"{bits} bits/param" if bits is not None else f"{budget / 1e6:.1f} MB"


def _plan_table(advice, sens, title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("layer", "format", "bits", "predicted cost"):
        t.add_column(col, justify="left" if col in ("layer", "format") else "right")
    for name, c in advice.choices.items():
        weights = sens.layers[name]["float32"]["bytes"] / 4
        t.add_row(name, c.format, f"{8 * c.nbytes / weights:.2f}", f"{c.cost:.2e}")
    head = advice.plan.layers.get("lm_head")
    if head is not None and head in sens.head:
        t.add_row("lm_head", head, f"{32 * sens.head[head]['bytes'] / sens.head['float32']['bytes']:.2f}",
                  f"{sens.head[head]['kl']:.2e}")
    emb = sens.embeddings[advice.plan.embeddings]
    t.add_row("embeddings", advice.plan.embeddings, f"{32 * emb['bytes'] / sens.embeddings['float32']['bytes']:.2f}",
              f"{emb['kl']:.2e}")
    return t


def _summary_table(advice):
    from rich.table import Table

    from lowbit.app.advisor import format_counts

    t = Table(title="formats chosen")
    for col in ("format", "layers", "predicted cost"):
        t.add_column(col, justify="left" if col == "format" else "right")
    costs: dict[str, float] = {}
    for c in advice.choices.values():
        costs[c.format] = costs.get(c.format, 0.0) + c.cost
    for fmt, n in format_counts(advice).items():
        t.add_row(fmt, str(n), f"{costs[fmt]:.3e}")
    t.add_row("total", str(len(advice.choices)), f"{advice.cost:.3e}")
    return t


def run_advisor(model: str, tokens: int, out: Path, compare_rows: list[dict], bits_grid=(4.25, 4.5, 5.0)) -> dict:
    """The demo's advisor part: sensitivities to the formats that need no calibration, the advised plans at a few
    budgets quantized and measured, and the frontier plot beside the measured uniform methods."""
    import lowbit
    from lowbit.analysis.sensitivity import measure_sensitivity
    from lowbit.app.advisor import advise as choose, format_counts
    from lowbit.app.compare import linear_bits_per_param
    from lowbit.app.report import plot_frontier
    from lowbit.cache import cache_dir
    from lowbit.eval.perplexity import perplexity

    body, text_name = read_text(None)
    m, tok = load(model)
    calibration = _calibration(tok, body, 8, 256, max(tokens, 8192), "the advisor")
    sens = measure_sensitivity(m, calibration, DEMO_FORMATS, kl=False, cache=cache_dir() / "sensitivity")
    reference = next(r["perplexity"] for r in compare_rows if r["method"] == "fp32")
    plans = []
    for b in bits_grid:
        a = choose(sens, bits=b)
        q = lowbit.quantize(copy.deepcopy(m), a.plan, progress=False)
        ppl = perplexity(q, tok, body, tokens, 512, progress=False)
        plans.append({"budget_bits": b, "bits": linear_bits_per_param(q), "perplexity": ppl, "ratio": ppl / reference,
                      "predicted_ratio": a.predicted_perplexity(reference) / reference, "formats": format_counts(a)})
        console.print(f"advised plan within {b} bits: {plans[-1]['bits']:.3f} bits/param, perplexity {ppl:.3f} "
                      f"(x{ppl / reference:.4f}; predicted x{plans[-1]['predicted_ratio']:.4f})")
    measured = [{"bits": p["bits"], "ratio": p["ratio"], "marker": "*", "color": "C3"} for p in plans]
    measured += [{"bits": r["bits_per_param_linear"], "ratio": r["perplexity"] / reference, "marker": "^",
                  "color": "C2", "label": r["method"]}
                 for r in compare_rows if r["method"] in ("nf4", "int4", "int8-weight", "fp4")]
    plot_frontier(sens, [3.25, 3.5, 4.0, 4.25, 4.5, 5.0, 6.0, 8.0], "fisher", "float32", reference,
                  out / "frontier.png", f"{model}: advised plans (RTN / NF4 / int8 formats)", measured=measured)
    return {"plans": plans, "formats": list(DEMO_FORMATS), "text": text_name, "plot": "frontier.png",
            "sensitivity_s": sens.reference.get("seconds")}


# The demo advises among the formats that need no calibration: its sensitivities take about a minute, not four.
DEMO_FORMATS = ("int8-weight", "nf4", "rtn4", "rtn4-g64", "rtn3", "rtn3-g64")
