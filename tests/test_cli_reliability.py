"""Reliability issue, items 8 and 10-14, each pinned: bounded JSON reading, quantizing a folder without a
tokenizer in memory, one writer per checkpoint folder, an empty --out, bitsandbytes' notice kept out of lowbit's
output, and a plan error that says what a plan needs."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

import lowbit
from lowbit.checkpoint import Saving, check_target
from lowbit.cli import app
from lowbit.folderlock import LOCK_NAME
from lowbit.interop.bitsandbytes import STATE_PREFIX, layer_from_bnb, layer_to_bnb
from lowbit.jsonfile import JSONFileError, loads_bounded, nesting_depth, read_json
from lowbit.nn import Linear4bit
from lowbit.plan import Plan
from lowbit.stream import quantize_checkpoint
from test_checkpoint import logits, tiny_llama

runner = CliRunner()
TESTS = Path(__file__).resolve().parent
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads alone raises RecursionError on this


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code: int, out: str, *needles: str) -> None:
    assert code == 2, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    for needle in needles:
        assert needle in out, (needle, out)


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory):
    """A 2-block Llama saved as a transformers folder (safetensors + config.json) without any tokenizer file."""
    path = tmp_path_factory.mktemp("notok")
    tiny_llama(tied=False).save_pretrained(path)
    assert not [p for p in path.iterdir() if "token" in p.name]
    return path


# Item 8: JSON read within bounds, one line naming the file.
def test_depth_is_counted_without_recursion_and_outside_strings():
    assert nesting_depth("[" * 1_000_000) > 64  # no RecursionError, however deep
    assert nesting_depth('{"a": [1, {"b": []}]}') == 4
    text = json.dumps({"name": "[" * 500 + "{" * 500, "k": [["\\\"[", "]"]]})  # brackets (and escapes) in strings
    assert nesting_depth(text) == 3 and loads_bounded(text, "x")["name"].startswith("[[[")
    with pytest.raises(JSONFileError, match=r"^the thing is too deeply nested \(JSON deeper than 64 levels\)$"):
        loads_bounded(DEEP, "the thing")
    assert loads_bounded("[" * 64 + "]" * 64, "x") is not None


def test_read_json_bounds_size_and_names_the_file(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"a": "x" * 100}))
    assert read_json(path)["a"] == "x" * 100
    with pytest.raises(JSONFileError, match=f"{path} is larger than 50 bytes"):
        read_json(path, max_bytes=50)
    path.write_bytes(b"\xff{}")
    with pytest.raises(JSONFileError, match=f"{path} is not valid JSON"):
        read_json(path)


def test_deep_lowbit_json_is_one_line_exit_2(tmp_path):
    ck = tmp_path / "ck"
    lowbit.save(tiny_llama(), ck)
    (ck / "lowbit.json").write_text(DEEP)
    with pytest.raises(lowbit.CheckpointError, match="lowbit.json is too deeply nested"):
        lowbit.load(ck)
    code, out = run("eval", ck, "--tokens", 16, "--threads", 1)
    one_line_error(code, out, "lowbit.json is too deeply nested")
    # A save over it reads the old manifest to keep its shards a while: a damaged one keeps nothing, and no traceback.
    model = tiny_llama()
    lowbit.save(model, ck)
    assert torch.equal(logits(lowbit.load(ck)), logits(model))


def test_deep_plan_file_is_one_line_exit_2(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(DEEP)
    code, out = run("quantize", "smollm2-135m", "--plan", plan, "--out", tmp_path / "q", "--threads", 1)
    one_line_error(code, out, "--plan", "too deeply nested")
    with pytest.raises(ValueError, match="cannot read the plan: .*plan.json is too deeply nested"):
        Plan.load(plan)


def test_deep_config_json_is_one_line_exit_2(tmp_path, no_tokenizer_dir):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(no_tokenizer_dir / "model.safetensors")
    (folder / "config.json").write_text('{"quantization_config": ' + DEEP + "}")
    with pytest.raises(lowbit.CheckpointError, match="config.json is too deeply nested"):
        lowbit.load(folder)  # no lowbit.json: it looks for transformers' lowbit config first
    code, out = run("quantize", folder, "--method", "nf4", "--out", tmp_path / "q", "--threads", 1)
    one_line_error(code, out, "config.json is too deeply nested")
    code, out = run("eval", folder, "--tokens", 16, "--threads", 1)
    one_line_error(code, out, "config.json is too deeply nested")


def test_deep_bitsandbytes_quant_state_is_a_checkpoint_error():
    state = layer_to_bnb(Linear4bit.from_linear(torch.nn.Linear(64, 32), "nf4", 64, True))
    state[STATE_PREFIX + "nf4"] = torch.tensor(list(DEEP.encode()), dtype=torch.uint8)
    with pytest.raises(lowbit.CheckpointError, match="quant_state tensor is too deeply nested"):
        layer_from_bnb(state)


# Item 10: a folder without a tokenizer quantizes in memory as it does streamed.
def test_in_memory_quantize_needs_no_tokenizer(tmp_path, no_tokenizer_dir):
    code, out = run("quantize", no_tokenizer_dir, "--method", "nf4", "--out", tmp_path / "streamed", "--threads", 1)
    assert code == 0, out
    code, out = run("quantize", no_tokenizer_dir, "--method", "nf4", "--in-memory", "--out", tmp_path / "mem",
                    "--threads", 1)
    assert code == 0, out
    assert torch.equal(logits(lowbit.load(tmp_path / "mem")), logits(lowbit.load(tmp_path / "streamed")))
    code, out = run("quantize", no_tokenizer_dir, "--method", "bf16", "--out", tmp_path / "bf16", "--threads", 1)
    assert code == 0, out
    assert lowbit.load(tmp_path / "bf16").state_dict()["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16


def test_where_a_tokenizer_is_needed_the_whole_reason_is_one_line(tmp_path, no_tokenizer_dir):
    code, out = run("quantize", no_tokenizer_dir, "--method", "gptq", "--in-memory", "--out", tmp_path / "g",
                    "--threads", 1)
    one_line_error(code, out, "holds no tokenizer")
    with pytest.raises(Exception) as why:
        AutoTokenizer.from_pretrained(no_tokenizer_dir)
    reason = " ".join(str(why.value).split())  # transformers' reason, whole (it spans lines), in one line
    code, out = run("eval", no_tokenizer_dir, "--tokens", 16, "--threads", 1)
    one_line_error(code, out, "holds no tokenizer", reason)


# Item 11: one writer per checkpoint folder.
_HOLDER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from lowbit.checkpoint import Saving
from test_checkpoint import tiny_llama

model = tiny_llama(tied=False)
with Saving(Path({ck!r}), 2**30) as saving:
    print("writing", flush=True)
    sys.stdin.readline()  # the test's other writers try now
    for name, t in model.state_dict().items():
        saving.add(name, t)
    saving.commit(model, {{}})
print("saved", flush=True)
"""


def test_a_second_writer_is_refused_with_the_first_ones_pid(tmp_path, no_tokenizer_dir):
    ck = tmp_path / "ck"
    lowbit.save(tiny_llama(), ck)  # a checkpoint already there: check_target alone would let a second save in
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(tests=str(TESTS), ck=str(ck))], env=cli_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "writing", holder.stderr.read()
        busy = rf"{ck} is being written by another process \(pid {holder.pid}\)"
        with pytest.raises(lowbit.CheckpointError, match=busy):
            lowbit.save(tiny_llama(), ck)
        with pytest.raises(lowbit.CheckpointError, match=busy):
            quantize_checkpoint(no_tokenizer_dir, ck, "nf4", progress=False)  # the streamed writer
        with pytest.raises(lowbit.CheckpointError, match=busy):
            with Saving(ck, 2**30):  # the save transaction itself, past check_target
                pass
        code, out = run("quantize", no_tokenizer_dir, "--method", "nf4", "--out", ck, "--threads", 1)
        one_line_error(code, out, f"is being written by another process (pid {holder.pid})")
        out, err = holder.communicate("\n", timeout=300)
    finally:
        holder.kill()
    assert holder.returncode == 0 and "saved" in out, err
    # The first writer's checkpoint is whole, and its lock file is gone: the folder takes the next save.
    assert torch.equal(logits(lowbit.load(ck)), logits(tiny_llama(tied=False)))
    assert not [p.name for p in ck.iterdir() if "lock" in p.name]
    check_target(ck)
    lowbit.save(tiny_llama(), ck)
    assert not [p.name for p in ck.iterdir() if "lock" in p.name]


def test_the_lock_file_is_never_junk(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with Saving(new, 2**30):
            raise RuntimeError("fails mid-save")
    assert not new.exists()  # a failed save into a new folder leaves not even the folder (nor its lock file)
    # The lock file of a save that was killed: no content, taken over by the next save, then removed.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / LOCK_NAME).write_text("999999")
    check_target(stale)
    lowbit.save(tiny_llama(), stale)
    assert not [p.name for p in stale.iterdir() if "lock" in p.name]


# Item 12: an empty --out is refused, not read as the current folder.
@pytest.mark.parametrize("args", [
    ["quantize", "smollm2-135m", "--method", "nf4"],
    ["export", "smollm2-135m", "--type", "q8_0"],
    ["advise", "smollm2-135m"],
    ["compare", "smollm2-135m"],
    ["demo"],
    ["outliers", "smollm2-135m"],
    ["train", "--data", "TEXT"],
    ["finetune", "smollm2-135m", "--data", "TEXT"],
], ids=lambda args: args[0])
@pytest.mark.parametrize("empty", ["", "  "], ids=["empty", "blank"])
def test_empty_out_is_refused(tmp_path, monkeypatch, args, empty):
    text = tmp_path / "notes.txt"
    text.write_text("some text to train on " * 50)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, out = run(*[text if a == "TEXT" else a for a in args], "--out", empty, "--threads", 1)
    one_line_error(code, out, "--out is empty")
    assert not list(cwd.iterdir())


def test_save_to_an_empty_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        with pytest.raises(lowbit.CheckpointError, match="checkpoint folder name is empty"):
            lowbit.save(tiny_llama(), empty)
    assert not list(tmp_path.iterdir())


# Item 13: bitsandbytes' notice about its optional `kernels` package stays out of lowbit's output.
NOTICE = ("gemm_4bit_forward", "pip install kernels", "kernels-community")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("cmd", [
    ["-m", "lowbit", "doctor"],
    ["-m", "lowbit", "finetune", "smollm2-135m", "--data", "TEXT", "--method", "gptq", "--out", "OUT", "--threads", "1"],
    ["-c", "import torch; from lowbit.app.peers import bnb_nf4_layer; bnb_nf4_layer(torch.nn.Linear(64, 64))"],
    ["-c", "import lowbit, lowbit.train, peft, bitsandbytes"],  # the library: peft imports bitsandbytes
], ids=["doctor", "finetune", "peers", "import"])
def test_bitsandbytes_kernel_notice_is_not_printed(tmp_path, cmd):
    text = tmp_path / "notes.txt"
    text.write_text("some text to train on " * 50)
    cmd = [str(text) if a == "TEXT" else str(tmp_path / "ft") if a == "OUT" else a for a in cmd]
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=cli_env(), timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode in (0, 2) and "Traceback" not in output, output  # finetune: gptq refused, one line
    for needle in NOTICE:
        assert needle not in output, output


# Item 14: the plan error says what a plan needs; "format" may be left out.
def test_plan_error_says_what_a_plan_needs(tmp_path):
    assert Plan.from_dict({"default": "nf4"}).default == "nf4"  # written by hand, without "format"
    assert Plan.from_dict({"format": "lowbit-plan", "layers": {}, "default": "int8-weight"}).default == "int8-weight"
    for bad in ({"format": "other", "default": "nf4"}, ["nf4"], "nf4"):
        with pytest.raises(ValueError) as e:
            Plan.from_dict(bad)
        message = str(e.value)
        assert '"layers"' in message and '"default"' in message and '"format"' in message, message
        assert "if given" in message and '"lowbit-plan"' in message, message
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "other", "default": "nf4"}))
    code, out = run("quantize", "smollm2-135m", "--plan", path, "--out", tmp_path / "q", "--threads", 1)
    one_line_error(code, out, '"format", if given, must be "lowbit-plan"')
