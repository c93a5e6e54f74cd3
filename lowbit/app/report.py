"""Tables, plots and the Markdown report of ``lowbit compare`` / ``outliers`` / ``demo``."""
from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


COMPARE_COLUMNS = [  # (header, key, format)
    ("method", "method", "s"), ("bits/param layers", "bits_per_param_linear", ".3f"),
    ("bits/param model", "bits_per_param_model", ".2f"), ("model MB", "model_mb", ".1f"),
    ("perplexity", "perplexity", ".3f"), ("vs fp32", "ppl_change_pct", "+.2f"),
    ("prefill tok/s", "prefill_tok_s", ".0f"), ("decode tok/s", "decode_tok_s", ".1f"),
]


def _cells(row: dict) -> list[str]:
    cells = []
    for _, key, spec in COMPARE_COLUMNS:
        v = row.get(key)
        if key == "perplexity" and v is not None and v > 1e5:
            cells.append(f"{v:.3g}")
        elif key == "ppl_change_pct" and v is not None:
            cells.append(f"{v:+.3g}%" if abs(v) > 1e4 else f"{v:+.2f}%")
        else:
            cells.append(_fmt(v, spec))
    return cells


def compare_table(rows: list[dict], title: str) -> Table:
    """The comparison as a rich table."""
    table = Table(title=title)
    for header, key, _ in COMPARE_COLUMNS:
        table.add_column(header, justify="left" if key == "method" else "right")
    for r in rows:
        table.add_row(*_cells(r))
    return table


def compare_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COMPARE_COLUMNS) + " |", "|" + "---|" * len(COMPARE_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def _label_points(ax, rows: list[dict]) -> None:
    """Scatter one labelled point per method; labels of points at the same x are stacked, not overlaid."""
    seen: dict[float, int] = {}
    for r in rows:
        x, y = r["bits_per_param_linear"], r["perplexity"]
        k = seen[round(x, 1)] = seen.get(round(x, 1), -1) + 1
        ax.scatter(x, y, s=36, zorder=3)
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(6, 4 + 11 * k), fontsize=8.5)


def plot_tradeoff(rows: list[dict], path: Path, title: str) -> Path:
    """Perplexity against bits/param: every method (log scale), and a linear zoom on those near fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r["perplexity"] for r in rows if r["method"] == "fp32"), min(r["perplexity"] for r in rows))
    near = [r for r in rows if r["perplexity"] <= 2 * base]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, subset, log in ((axes[0], rows, True), (axes[1], near, False)):
        _label_points(ax, subset)
        ax.axhline(base, color="grey", lw=0.8, ls="--", label="fp32")
        ax.set_xscale("log", base=2)
        ax.set_xticks([2, 3, 4, 5, 8, 16, 32], ["2", "3", "4", "5", "8", "16", "32"])
        if log:
            ax.set_yscale("log")
        else:
            ax.margins(y=0.15)
        ax.set_xlabel("bits per parameter of the linear layers (every constant counted)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity (log scale)")
    axes[0].set_title("all methods", fontsize=10)
    axes[1].set_ylabel("perplexity")
    axes[1].set_title("zoom: methods within 2x of fp32's perplexity", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_outlier_heatmap(report, path: Path, title: str) -> Path:
    """Largest |x| per watched input (rows) and hidden dimension (columns); outlier features marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(10, 5))
    data = report.max_abs.clamp_min(1e-2).numpy()
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="magma", norm=LogNorm(vmin=0.1, vmax=max(data.max(), 10)))
    fig.colorbar(im, ax=ax, label="max |x| over all positions")
    for f in report.features:
        ax.axvline(f["dim"], color="cyan", lw=0.6, alpha=0.6)
    ax.set_xlabel(f"hidden dimension (cyan: outlier features, |x| >= {report.threshold:g} in >= 25% of layers and >= 6% of positions)")
    ax.set_ylabel("watched linear input (by depth)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def outlier_table(summary: dict, title: str, limit: int = 20) -> Table:
    table = Table(title=title)
    for col in ("dim", "max |x|", "layers", "layer share", "position share"):
        table.add_column(col, justify="right")
    for f in summary["features"][:limit]:
        table.add_row(str(f["dim"]), f"{f['max_abs']:.1f}", f"{f['layers']}/{summary['layers']}",
                      f"{100 * f['layer_share']:.0f}%", f"{100 * f['position_share']:.1f}%")
    return table


def write_json(data, path: Path) -> Path:
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def _outlier_markdown(s: dict) -> str:
    lines = [f"### {s['model']} ({s['model_kind']})", "",
             f"{s['positions']} positions of {s['text']}; {s['layers']} layers ({s['watched_inputs']} watched linear inputs "
             f"of width {s['width']}). **{s['outlier_features']} dimension(s) meet the criteria**, in "
             f"{s['layers_with_outlier_features']} of {s['layers']} layers; {s['dims_reaching_threshold']} of {s['width']} "
             f"dimensions reach |x| >= {s['threshold']:g} somewhere.", ""]
    if s["features"]:
        lines += ["| dim | max abs | layers | layer share | position share |", "|---|---|---|---|---|"]
        lines += [f"| {f['dim']} | {f['max_abs']:.1f} | {f['layers']}/{s['layers']} | {100 * f['layer_share']:.0f}% | "
                  f"{100 * f['position_share']:.1f}% |" for f in s["features"][:20]]
    ab = s.get("ablation")
    if ab:
        lines += ["", f"Ablation ({ab['metric']}, {ab['tokens']} tokens): unablated {ab['baseline']:.4g}; "
                      f"outlier dimensions {ab['dims']} zeroed: **{ab['outliers_zeroed']:.4g}**; "
                      f"{len(ab['random_dims'])} random dimensions {ab['random_dims']} zeroed: **{ab['random_zeroed']:.4g}**."]
    signs = s.get("hard_case", [])
    advice = list(dict.fromkeys(x["advice"] for x in signs))
    if signs and s.get("causal_lm", True):  # the advisor plans causal LMs only
        advice.append(advisor_hint(s["model"]))
    lines += ["", "**A hard case to quantize?** " + ("; ".join(f"{x['what']}: {x['figure']}" for x in signs) + ". "
                                                     + " ".join(advice)
                                                     if signs else f"no sign (largest |x| {s['max_abs']:.1f}).")]
    lines += ["", f"![outlier heatmap]({s['heatmap']})", ""]
    return "\n".join(lines)


def advisor_hint(model: str) -> str:
    """The sentence after a causal LM's hard-case signs: the command that plans each layer's precision."""
    return f"`lowbit advise {model} --bits B` chooses the precision of each layer within a budget of B bits/param."


def _advisor_markdown(advisor: dict | None) -> list[str]:
    if not advisor:
        return []
    lines = ["## Per-layer formats within a budget (`lowbit advise`)", "",
             "Each linear layer's sensitivity to each format (" + ", ".join(advisor["formats"]) + ") was estimated "
             "by its Fisher-weighted output error on calibration text past the scored part; an exact knapsack chose "
             "the formats of least predicted loss within each budget. Same protocol as the table above.", "",
             "| budget | bits/param layers | perplexity | vs fp32 | predicted vs fp32 | formats chosen |",
             "|---|---|---|---|---|---|"]
    for p in advisor["plans"]:
        formats = ", ".join(f"{k} {v}" for k, v in p["formats"].items())
        lines.append(f"| {p['budget_bits']} bits | {p['bits']:.3f} | {p['perplexity']:.3f} | "
                     f"{100 * (p['ratio'] - 1):+.2f}% | {100 * (p['predicted_ratio'] - 1):+.2f}% | {formats} |")
    lines += ["", f"![advised plans beside uniform methods]({advisor['plot']})", "",
              "With GPTQ and SpQR among the candidates (`lowbit advise --bits 4.5`) the plans do better: "
              "docs/advisor.md.", ""]
    return lines


def write_report(out: Path, rows: list[dict], outlier_summaries: list[dict], protocol: str, machine: str,
                 seconds: float, speed_protocol: str = "", advisor: dict | None = None) -> Path:
    """The demo's Markdown report: comparison table and plot, outlier analyses, protocol and machine."""
    from lowbit.version import __version__

    parts = [
        "# lowbit report: SmolLM2-135M", "",
        f"lowbit {__version__}; {machine}; the whole report took {seconds:.0f} s.", "",
        "## What each method costs", "",
        f"Protocol: {protocol}; loss over every predicted token. Speeds: {speed_protocol}, on the machine above. "
        "bits/param layers: stored bits "
        "of the quantized linear layers per weight, every constant counted (absmax, nested absmax, scales, zero points, "
        "codebooks); bits/param model: the whole model's bytes per parameter, the fp32 embeddings (tied to the LM "
        "head, never quantized) included. `lowbit demo --tokens 8192` runs the full protocol of docs/quality.md.", "",
        compare_markdown(rows), "",
        "![perplexity against bits per parameter](tradeoff.png)", "",
        "Methods:", "",
        *[f"- **{r['method']}**: {r.get('description', '')}" for r in rows], "",
        "Caveats: the bundled SmolLM2-135M comes as a Q4_1 GGUF (asymmetric 4-bit, blocks of 32), so its weights "
        "already lie on a 4-bit grid and 4-bit results look better than they would on a true fp16 model. Ternary "
        "here is post-training quantization of a model not trained for it; BitNet b1.58 reaches its quality only "
        "when trained ternary from the start.", "",
        "## Emergent outlier features (LLM.int8(), section 4)", "",
        "Criteria: |x| >= 6 in the inputs of the hidden-width linear layers, in >= 25% of the transformer layers and "
        ">= 6% of the sequence positions. Ablation: perplexity (or, for the encoder, the cosine similarity of "
        "sentence embeddings to the unablated model's) when those dimensions are zeroed in every such input, "
        "against zeroing as many random dimensions.", "",
        *_advisor_markdown(advisor),
        *[_outlier_markdown(s) for s in outlier_summaries],
        "Every figure is also in `compare.json` and `outliers-*.json` beside this file.", "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path


def plot_frontier(sens, grid: list[float], cost: str, embeddings: str, reference: float, path: Path, title: str,
                  chosen: tuple[float, float] | None = None, measured: list[dict] | None = None) -> Path:
    """Predicted perplexity vs bits per linear weight: the advised plans' frontier, each uniform format's point, and
    measured points where given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit.app.advisor import UNIFORM, frontier, uniform

    plans = frontier(sens, grid, cost, embeddings)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([a.bits for a in plans], [a.predicted_perplexity(reference) / reference for a in plans], "o-",
            label="advised plans (predicted)")
    fmts = [f for f in UNIFORM if all(f in v for v in sens.layers.values())]
    for f in fmts:
        u = uniform(sens, f, cost, embeddings)
        ax.plot(u.bits, u.predicted_perplexity(reference) / reference, "s", color="gray",
                label="uniform formats (predicted)" if f == fmts[0] else None)
        ax.annotate(f, (u.bits, u.predicted_perplexity(reference) / reference), fontsize=8,
                    xytext=(4, 2), textcoords="offset points")
    labels = {"*": "advised plans (measured)", "^": "uniform methods (measured)"}
    for row in measured or []:
        marker = row.get("marker", "^")
        ax.plot(row["bits"], row["ratio"], marker, color=row.get("color", "C3"), markersize=9,
                label=labels.pop(marker, None))
        if row.get("label"):
            ax.annotate(row["label"], (row["bits"], row["ratio"]), fontsize=8, color=row.get("color", "C3"),
                        xytext=(4, -10), textcoords="offset points")
    if chosen is not None:
        ax.plot(chosen[0], chosen[1] / reference, "*", markersize=14, color="C3", label="this plan (measured)")
    ax.set_xlabel("bits per weight (linear layers)")
    ax.set_ylabel("perplexity / full precision")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
