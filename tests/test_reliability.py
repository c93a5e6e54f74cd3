"""Issue 14's defects, each pinned: configs that check themselves, errors before work, no half-done quantize,
writes that fail cleanly, and the smaller ones (labels, permissions, --version, one behaviour for inf)."""
import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.config import GPTQConfig, Int8Config, IntConfig, NF4Config, SpQRConfig, config_from_json, config_from_name
from test_checkpoint import logits, tiny_llama

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


# Item 6: configs validate themselves.
@pytest.mark.parametrize("make,message", [
    (lambda: NF4Config(blocksize=0), "blocksize must be a positive integer"),
    (lambda: NF4Config(blocksize=-64), "blocksize must be a positive integer"),
    (lambda: NF4Config(blocksize=63), "blocksize must be even"),
    (lambda: NF4Config(quant_type="int5"), "quant_type must be one of"),
    (lambda: NF4Config(quant_type="int4", double_quant=True), "double_quant applies to"),
    (lambda: IntConfig(group_size=0), "group_size must be a positive integer"),
    (lambda: IntConfig(bits=5), "bits must be one of"),
    (lambda: Int8Config(threshold=-1), "threshold must be a number >= 0"),
    (lambda: Int8Config(activations="minmax"), "activations must be one of"),
    (lambda: GPTQConfig(damp=0), "damp must be a number > 0"),
    (lambda: SpQRConfig(max_outliers=2), "max_outliers must be a number >= 0.0 and <= 1.0"),
    (lambda: NF4Config(skip="lm_head"), "skip must be a list"),
    (lambda: config_from_name("nf4", bits=3), "bits does not apply to nf4"),
    (lambda: config_from_name("int9"), "unknown quantization method"),
])
def test_configs_refuse_bad_fields_when_made(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_the_readme_int4_config_and_method_names_work():
    assert NF4Config(quant_type="int4").double_quant is False  # the README's NF4Config(quant_type="int4")
    assert NF4Config().double_quant is True
    model = lowbit.quantize(tiny_llama(), NF4Config(quant_type="int4"), progress=False)
    up = model.model.layers[0].mlp.up_proj  # uniform 4-bit groups: an IntLinear since the format registry (issue 33)
    assert (type(up).__name__, up.bits, up.group_size, up.weight_scale.dtype) == ("IntLinear", 4, 64, torch.float32)
    by_name = lowbit.quantize(tiny_llama(), "nf4", progress=False)
    assert by_name.lowbit_config == NF4Config() and torch.equal(
        logits(by_name), logits(lowbit.quantize(tiny_llama(), NF4Config(), progress=False)))
    assert config_from_json('{"method": "nf4"}') == NF4Config()
    assert config_from_json('{"method": "fp4", "blocksize": 128}') == NF4Config(quant_type="fp4", blocksize=128)
    with pytest.raises(ValueError, match="disagree"):
        config_from_json('{"method": "fp4", "quant_type": "nf4"}')
    assert config_from_name("gptq3") == GPTQConfig(bits=3)
    with pytest.raises(TypeError, match="method name such as 'nf4'"):
        lowbit.quantize(tiny_llama(), {"method": "nf4"})


# Item 7: a quantize that fails leaves the model as it was and names the layer.
def test_failed_quantize_names_the_layer_and_changes_nothing():
    model = tiny_llama()
    before = logits(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.k_proj: .*NaN or Inf.*left unchanged"):
        lowbit.quantize(model, NF4Config(), progress=False)
    assert not any(isinstance(m, lowbit.nn.QuantLinear) for m in model.modules())
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = 0.0
    lowbit.quantize(model, NF4Config(), progress=False)  # the retry is not refused as "already quantized"
    assert isinstance(model.model.layers[0].self_attn.k_proj, lowbit.nn.Linear4bit)
    assert before.shape == logits(model).shape


def test_calibration_ids_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"calibration must be token ids of shape \[sequences, length\]"):
        lowbit.quantize(tiny_llama(), GPTQConfig(), calibration=torch.arange(64), progress=False)


# Item 5: writes that fail leave nothing behind and say why in one line.
def test_a_failing_write_leaves_no_folder_and_raises_checkpoint_error(tmp_path, monkeypatch):
    from lowbit.shards import ShardWriter

    def disk_full(self, part, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "_write", disk_full)
    with pytest.raises(lowbit.CheckpointError, match="No space left on device"):
        lowbit.save(tiny_llama(), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_shards_and_manifest_get_the_same_permissions(tmp_path):
    lowbit.save(tiny_llama(), tmp_path / "ck")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ck").iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes


@pytest.mark.parametrize("args,message", [
    (["quantize", "no-such-model", "--out", "{file}"], "exists and is not a directory"),
    (["quantize", "no-such-model", "--method", "nf4", "--blocksize", "0", "--out", "{dir}/q"], "blocksize must be a positive"),
    (["quantize", "no-such-model", "--method", "nf4", "--bits", "3", "--threshold", "2", "--out", "{dir}/q"],
     "--bits and --threshold do not apply to nf4"),
    (["quantize", "no-such-model", "--max-shard-size", "foo", "--out", "{dir}/q"], "--max-shard-size"),
    (["quantize", "no-such-model", "--method", "bf16", "--blocksize", "64", "--out", "{dir}/q"], "does not apply to bf16"),
    (["compare", "no-such-model", "--tokens", "-3"], "--tokens"),
    (["compare", "no-such-model", "--out", "{file}"], "exists and is not a folder"),
    (["outliers", "no-such-model", "--out", "{file}"], "exists and is not a folder"),
    (["eval", "no-such-model", "--json", "{dir}/missing/e.json"], "does not exist"),
    (["eval", "no-such-model", "--threads", "0"], "--threads must be >= 1"),
    (["finetune", "no-such-model", "--data", "{file}", "--out", "{file}"], "exists and is not a folder"),
])
def test_errors_knowable_at_the_start_come_before_loading(tmp_path, args, message):
    (tmp_path / "f.txt").write_text("some text " * 100)
    args = [a.format(file=tmp_path / "f.txt", dir=tmp_path) for a in args]
    code, out = run(*args)
    # "no-such-model" would be the error if the model were loaded first: the bad option is named instead.
    assert code == 2 and message in " ".join(out.split()) and "no-such-model" not in out, out


def test_version_and_real_token_count_and_checkpoint_label(tmp_path, smollm):
    code, out = run("--version")
    assert code == 0 and out.strip() == f"lowbit {lowbit.__version__}"
    (tmp_path / "two.txt").write_text("Hello world")
    model, tok = smollm
    n = len(tok("Hello world").input_ids)
    ck = tmp_path / "ck"
    import copy

    lowbit.save(lowbit.quantize(copy.deepcopy(model), NF4Config(), progress=False), ck, tokenizer=tok)
    code, out = run("eval", ck, "--text", tmp_path / "two.txt", "--tokens", 2048, "--no-speed", "--json", tmp_path / "e.json")
    assert code == 0, out
    row = json.loads((tmp_path / "e.json").read_text())
    assert f"first {n} tokens" in row["protocol"] and row["method"] == "nf4 checkpoint"
    assert "(nf4 checkpoint)" in out


def test_progress_bars_stay_out_of_logs(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:  # stderr is a file, not a terminal
        proc = subprocess.run([sys.executable, "-m", "lowbit", "quantize", "smollm2-135m", "--method", "int8",
                               "--out", str(tmp_path / "ck")], stdout=f, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, log.read_text()
    assert "\r" not in log.read_text() and "\x1b[" not in log.read_text()


def test_post_training_ternary_warns():
    with pytest.warns(UserWarning, match="ternary weights made post-training"):
        lowbit.quantize(tiny_llama(), lowbit.TernaryConfig(), progress=False)


# Item 9: one behaviour for NaN and inf in LLM.int8 layers, on every path.
@pytest.mark.parametrize("rows", [1, 40])  # the fused GEMV path and the torch-op path
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_int8_layers_refuse_nan_and_inf_alike(rows, bad):
    layer = lowbit.nn.Int8Linear.from_linear(torch.nn.Linear(64, 32))
    x = torch.randn(rows, 64)
    x[0, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        with torch.no_grad():
            layer(x)


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    from lowbit.cli import common

    cores = min(len(os.sched_getaffinity(0)), os.cpu_count())
    for idle, want in ((cores, cores), (cores - 0.8, max(1, cores - 1)), (0.1, 1)):
        monkeypatch.setattr(common, "idle_cores", lambda idle=idle: idle)
        assert common.default_threads() == want
    if common._cpu_times() is not None:  # Linux: the real sample is a number of cores
        assert 0 <= common.idle_cores(0.05) <= os.cpu_count() + 0.01


def test_forced_threads_beyond_the_idle_cores_stop_openmp_spinning(monkeypatch):
    from lowbit import cli
    from lowbit.cli import common

    assert common.forced_threads(["eval", "--threads", "2"]) == 2 and common.forced_threads(["x", "--threads=3"]) == 3
    assert common.forced_threads(["eval"]) is None and common.forced_threads(["eval", "--threads"]) is None
    need = common.passive_wait_needed
    assert need(["eval", "--threads", "2"], {}, lambda: 1.0)  # one of two cores busy
    assert not need(["eval", "--threads", "2"], {}, lambda: 1.9)  # both idle: spinning pays
    assert not need(["eval", "--threads", "2"], {"OMP_WAIT_POLICY": "ACTIVE"}, lambda: 0.0)  # the user's choice
    assert not need(["eval"], {}, lambda: 0.0)  # the default count already leaves busy cores alone
    assert not need(["eval", "--threads", "1"], {}, lambda: 0.0)  # one thread never waits for another
    # The command starts itself again with the policy set (OpenMP reads it once, when torch loads).
    calls = []
    monkeypatch.setattr(common, "idle_cores", lambda: 0.9)
    monkeypatch.setattr(cli.sys, "argv", ["lowbit", "eval", "--threads", "2"])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: calls.append(argv) or (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == [[sys.executable, "-m", "lowbit", "eval", "--threads", "2"]]
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_quantize_lets_go_of_the_storage_full_precision_weights_came_in():
    # transformers memory-maps checkpoints: every tensor is a view into one mapping of the file, kept whole (and
    # resident) while any of them lives. Here the views come from one big tensor standing for that mapping.
    model = tiny_llama(tied=True)
    params = list(dict.fromkeys(model.parameters()))
    blob = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = blob[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    lowbit.quantize(model, NF4Config(), progress=False)
    for name, p in model.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_library_progress_bars_draw_only_on_a_terminal(capsys):
    # tqdm's disable=None: a bar where stderr is a terminal, none in a log or a pipe (pytest's capture is neither).
    lowbit.quantize(tiny_llama(), NF4Config())  # progress=True, the default
    assert "quantizing" not in capsys.readouterr().err
