"""Hard-case signs: raised by planted outlier features and large activations, not by a model without them; the
thresholds at their edges; `lowbit eval`'s 8/4-bit probe on SmolLM2 (whose 4-bit round-to-nearest costs about 31%,
docs/advisor.md) and `lowbit outliers`' signs in its JSON."""
import json

import pytest
import torch
from typer.testing import CliRunner

from lowbit.analysis import find_outliers
from lowbit.analysis.hard_case import LARGE_ACTIVATION, activation_signs, degradation_signs
from lowbit.app.synthetic import outlier_model
from lowbit.cli import app


def summary_of(model, vocab=512):
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, vocab, (1, 128), generator=g) for _ in range(4)]
    with torch.no_grad():
        return find_outliers(model, windows, progress=False).summary()


def test_planted_outliers_raise_both_activation_signs_and_name_the_planted_dims():
    model = outlier_model("llama", hidden=64, layers=2, vocab=512, outlier_dims=3, gain=(40.0, 50.0))
    signs = {s.what: s for s in activation_signs(summary_of(model))}
    assert set(signs) == {"outlier features", "large activations"}
    named = signs["outlier features"].figure
    assert named.startswith("3 feature(s)") and all(str(d) in named for d in model.outlier_dims)
    assert "`int8`" in signs["outlier features"].advice
    assert not any("lowbit " in s.advice for s in signs.values())  # commands are the app's to add


def test_a_model_without_outliers_raises_no_sign():
    model = outlier_model("llama", hidden=64, layers=2, vocab=512, outlier_dims=0)
    s = summary_of(model)
    assert s["max_abs"] < 6 and activation_signs(s) == []


def test_activation_threshold_edges():
    base = {"outlier_features": 0, "features": [], "layers_with_outlier_features": 0, "layers": 4}
    assert activation_signs({**base, "max_abs": LARGE_ACTIVATION - 0.01}) == []
    (sign,) = activation_signs({**base, "max_abs": LARGE_ACTIVATION})
    assert sign.what == "large activations" and "0.25" in sign.figure  # the int8 step 32/127


@pytest.mark.parametrize("ratio8,ratio4,expected", [
    (1.0, 1.05, set()),
    (1.0, 1.0999, set()),
    (1.0, 1.10, {"steep loss from 8 to 4 bits"}),
    (1.01, 1.31, {"steep loss from 8 to 4 bits", "8 bits already lose"}),
    (1.05, 1.12, {"8 bits already lose"}),  # 4 bits lose 12%, but 8 bits already 5%: no steep step between them
    (1.0099, 1.02, set()),
])
def test_degradation_threshold_edges(ratio8, ratio4, expected):
    assert {s.what for s in degradation_signs(ratio8, ratio4)} == expected


def test_eval_probes_8_and_4_bits_and_calls_smollm2_a_hard_case(tmp_path, smollm):
    result = CliRunner().invoke(app, ["eval", "smollm2-135m", "--tokens", "256", "--window", "128", "--no-speed",
                                      "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "e.json").read_text())
    probe = row["probe"]
    assert probe["perplexity"] == row["perplexity"]  # the same tokens and windows: scored once
    assert probe["tokens"] == 256 and 0.99 < probe["ratio8"] < 1.01 and probe["ratio4"] > 1.10
    assert [s["what"] for s in probe["hard_case"]] == ["steep loss from 8 to 4 bits"]
    assert "hard case" in result.output and "lowbit advise" in " ".join(result.output.split())
    # a quantized model is what it is: no probe
    result = CliRunner().invoke(app, ["eval", "smollm2-135m", "-m", "nf4", "--tokens", "128", "--window", "128",
                                      "--no-speed", "--json", str(tmp_path / "q.json")])
    assert result.exit_code == 0 and "probe" not in json.loads((tmp_path / "q.json").read_text())


def test_outliers_json_holds_the_signs(tmp_path, smollm):
    result = CliRunner().invoke(app, ["outliers", "smollm2-135m", "--tokens", "256", "--no-ablation",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "outliers-smollm2-135m.json").read_text())
    # SmolLM2-135M has one systematic outlier feature (docs/quality.md)
    assert summary["outlier_features"] >= 1 and summary["max_abs"] >= max(f["max_abs"] for f in summary["features"])
    assert "outlier features" in [s["what"] for s in summary["hard_case"]] and "hard case" in result.output
