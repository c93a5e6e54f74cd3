"""Signs that a model will quantize badly, read from its activations and from what 8 and 4 bits cost it.

Each sign carries the figure that raised it and what to do about it. The thresholds:
- an outlier feature by LLM.int8()'s criteria (|x| >= 6 in >= 25% of the layers and >= 6% of the positions;
  Dettmers et al., 2022): activations quantized per token or per tensor without splitting these dimensions out lose
  accuracy, and the paper saw vector-wise int8 collapse once they reach every layer;
- a largest activation of at least 32: a per-token absmax int8 step is then at least 32/127 = 0.25, so an entry of the
  typical size 1 of a normalised hidden state is rounded with an error of up to 12.6%;
- 4-bit round-to-nearest (groups of 128) costing at least 10 points of perplexity more than 8-bit, or 8 bits at
  least 1%: a loss a user sees,
  where calibrated methods or more bits are worth their cost (on SmolLM2-135M, NF4 costs 27% and GPTQ Q4_K 2-4%).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

LARGE_ACTIVATION = 32.0
STEEP_4BIT = 0.10  # 4-bit round-to-nearest's perplexity ratio minus 8-bit's
LOSSY_8BIT = 0.01  # perplexity ratio - 1 of 8-bit round-to-nearest


@dataclass(frozen=True)
class Sign:
    """One reason to expect a model to quantize badly: what, the figure that raised it, and what to do (in lowbit's
    method names; the app adds the commands)."""

    what: str
    figure: str
    advice: str

    def to_dict(self) -> dict:
        return asdict(self)


def activation_signs(summary: dict) -> list[Sign]:
    """Signs in an outlier summary (`OutlierReport.summary()`): outlier features and large activations."""
    signs = []
    n = summary["outlier_features"]
    if n:
        dims = ", ".join(str(f["dim"]) for f in summary["features"][:8]) + (", ..." if n > 8 else "")
        signs.append(Sign(
            "outlier features",
            f"{n} feature(s) (dims {dims}) in {summary['layers_with_outlier_features']} of {summary['layers']} layers",
            "int8 activations need these dimensions split out: use `int8` (LLM.int8), not per-row W8A8 without "
            "the split; weight-only formats (nf4, gptq4, GGUF k-quants) are not affected."))
    peak = summary.get("max_abs")
    if peak is not None and peak >= LARGE_ACTIVATION:
        signs.append(Sign(
            "large activations",
            f"max |x| {peak:.1f} entering the linear layers (>= {LARGE_ACTIVATION:g}): a per-token int8 step of "
            f"{peak / 127:.2f}",
            "quantize activations only with an outlier split (`int8`) or after a Hadamard rotation; keep "
            "weight-only formats otherwise."))
    return signs


def degradation_signs(ratio8: float, ratio4: float) -> list[Sign]:
    """Signs in the perplexity ratios (quantized / unquantized) of 8- and 4-bit round-to-nearest."""
    signs = []
    if ratio4 - ratio8 >= STEEP_4BIT:
        signs.append(Sign(
            "steep loss from 8 to 4 bits",
            f"4-bit round-to-nearest costs {ratio4 - 1:+.1%} perplexity, 8-bit {ratio8 - 1:+.2%}",
            "at 4 bits use a calibrated method (gptq4, spqr, GGUF q4_k with an imatrix) or 5-6 bits (q5_k, q6_k) "
            "for the layers that need them. Models trained on many tokens per parameter lose the most "
            "(docs/research.md, Study B)."))
    if ratio8 - 1 >= LOSSY_8BIT:
        signs.append(Sign(
            "8 bits already lose",
            f"8-bit round-to-nearest costs {ratio8 - 1:+.2%} perplexity",
            "keep the most sensitive layers in bf16, with a per-layer plan."))
    return signs
