"""The lowbit command end to end on small token budgets: exit codes, files written, JSON fields, one-line errors."""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_help_has_an_example_for_every_command():
    for cmd in ("quantize", "eval", "compare", "outliers", "demo", "doctor", "finetune"):
        code, out = run(cmd, "--help")
        assert code == 0 and "Example: lowbit" in out, cmd
    proc = subprocess.run([sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "compare" in proc.stdout


def test_doctor_names_the_cpu_its_features_and_the_chosen_paths():
    from lowbit import kernels
    from lowbit.kernels import cpu

    code, out = run("doctor")
    assert code == 0, out
    assert cpu.cpu_model() in out and kernels.describe() in " ".join(out.split())
    for feature in cpu.DECIDING:  # each feature in a row, saying whether this CPU has it
        row = next(line for line in out.splitlines() if f" {feature} " in line)
        assert ("yes" in row) == (feature in cpu.cpu_flags()), row


def test_quantize_then_eval_a_checkpoint(tmp_path, smollm):
    code, out = run("quantize", "smollm2-135m", "--method", "int8", "--out", tmp_path / "ck")
    assert code == 0, out
    assert (tmp_path / "ck" / "lowbit.json").is_file()
    assert json.loads((tmp_path / "ck" / "lowbit.json").read_text())["quantization"]["method"] == "int8"
    code, out = run("eval", tmp_path / "ck", "--tokens", 300, "--window", 128, "--stride", 64, "--json", tmp_path / "e.json")
    assert code == 0, out
    row = json.loads((tmp_path / "e.json").read_text())
    assert 5 < row["perplexity"] < 100 and row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    assert "stride 64" in row["protocol"] and "threads" in row["machine"]
    assert 8 < row["bits_per_param_linear"] < 8.1


def test_compare_writes_table_plot_and_json(tmp_path):
    code, out = run("compare", "smollm2-135m", "--methods", "fp32,nf4,int8-weight", "--tokens", 256, "--no-speed",
                    "--out", tmp_path)
    assert code == 0, out
    data = json.loads((tmp_path / "compare.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"fp32", "nf4", "int8-weight"}
    assert rows["fp32"]["ppl_change_pct"] == 0 and rows["nf4"]["ppl_change_pct"] > rows["int8-weight"]["ppl_change_pct"]
    assert rows["fp32"]["bits_per_param_linear"] == 32 and 4.1 < rows["nf4"]["bits_per_param_linear"] < 4.2
    assert rows["nf4"]["model_mb"] < rows["fp32"]["model_mb"] / 3
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    assert "256 tokens" in data["protocol"] and "perplexity" in out


@pytest.mark.parametrize("model", ["smollm2-135m", "all-minilm-l6-v2"])
def test_outliers_command(tmp_path, model):
    code, out = run("outliers", model, "--tokens", 512, "--out", tmp_path)
    assert code == 0, out
    stem = model.replace(".", "-")
    summary = json.loads((tmp_path / f"outliers-{stem}.json").read_text())
    assert {"outlier_features", "layers", "positions", "features", "dims_reaching_threshold"} <= set(summary)
    assert (tmp_path / f"outliers-{stem}.png").stat().st_size > 10_000
    if summary["features"]:
        ab = summary["ablation"]
        assert {"baseline", "outliers_zeroed", "random_zeroed"} <= set(ab) and len(ab["random_dims"]) == len(ab["dims"])
    # both have outlier features (docs/quality.md); the per-layer advisor plans causal LMs, so only SmolLM2 is sent
    # to it, and once
    causal = model == "smollm2-135m"
    assert summary["hard_case"] and summary["causal_lm"] == causal
    assert " ".join(out.split()).count("lowbit advise") == (1 if causal else 0)


def test_demo_writes_the_report(tmp_path):
    code, out = run("demo", "--tokens", 256, "--no-speed", "--out", tmp_path)
    assert code == 0, out
    report = (tmp_path / "README.md").read_text()
    for needle in ("| method |", "nf4", "ternary", "tradeoff.png", "outliers-smollm2-135m.png", "all-minilm-l6-v2",
                   "first 256 tokens", "threads", "frontier.png", "lowbit advise", "advised plan", "A hard case to quantize?"):
        assert needle in report, needle
    assert len(json.loads((tmp_path / "compare.json").read_text())["rows"]) == 9
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


@pytest.mark.parametrize("args,message", [
    (["eval", "/no/such/model"], "no such model"),
    (["compare", "smollm2-135m", "--methods", "fp32,int9"], "unknown method 'int9'"),
    (["quantize", "smollm2-135m", "--method", "fp32", "--out", "x"], "fp32 is the unquantized model"),
    (["eval", "smollm2-135m", "--text", "/no/such.txt"], "text file not found"),
    (["eval", "smollm2-135m", "--stride", "0"], "--stride"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    code, out = run(*args)
    assert code == 2 and message in out and "Traceback" not in out
    assert len(out.strip().splitlines()) <= 2  # rich may wrap the one line


def test_unsupported_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    code, out = run("eval", tmp_path, "--tokens", 64)
    assert code == 2 and "cannot load" in out and "Traceback" not in out
    (tmp_path / "weights.bin").write_text("x")
    code, out = run("quantize", tmp_path / "weights.bin", "--out", tmp_path / "o")
    assert code == 2 and "not a .gguf" in out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm):
    """A 2-block Llama with SmolLM2's tokenizer, saved as a transformers folder: calibration runs in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_gptq_and_spqr_through_the_cli(tmp_path, tiny_model_dir):
    code, out = run("quantize", tiny_model_dir, "--method", "gptq", "--bits", 3, "--out", tmp_path / "g")
    assert code == 0, out
    manifest = json.loads((tmp_path / "g" / "lowbit.json").read_text())
    assert manifest["quantization"]["method"] == "gptq" and manifest["quantization"]["bits"] == 3
    assert {spec["type"] for spec in manifest["layers"].values()} == {"IntLinear"}
    code, out = run("eval", tmp_path / "g", "--tokens", 256, "--no-speed")
    assert code == 0 and "perplexity" in out, out
    code, out = run("compare", tiny_model_dir, "--methods", "fp32,rtn3,gptq3,spqr3", "--tokens", 256, "--no-speed",
                    "--out", tmp_path / "c")
    assert code == 0, out
    rows = {r["method"]: r for r in json.loads((tmp_path / "c" / "compare.json").read_text())["rows"]}
    assert set(rows) == {"fp32", "rtn3", "gptq3", "spqr3"}
    assert 3.1 < rows["gptq3"]["bits_per_param_linear"] < 3.4 and rows["spqr3"]["bits_per_param_linear"] > 3.5
    code, out = run("quantize", tiny_model_dir, "--method", "gptq", "--bits", 5, "--out", tmp_path / "x")
    assert code == 2 and "--bits" in out


def test_bf16_checkpoint_from_the_cli_opens_in_eval(tmp_path, tiny_model_dir):
    code, out = run("quantize", tiny_model_dir, "--method", "bf16", "--out", tmp_path / "b")
    assert code == 0, out
    code, out = run("eval", tmp_path / "b", "--tokens", 64, "--no-speed", "--json", tmp_path / "e.json")
    assert code == 0, out
    assert json.loads((tmp_path / "e.json").read_text())["method"] == "bf16"
