"""lowbit finetune as a user runs it: files written, held-out perplexity, bit-identical resume after a kill,
and one-line errors (exit code 2, nothing half written) on bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowbit.cli import app

pytest.importorskip("peft")
pytestmark = pytest.mark.slow
runner = CliRunner()
SMALL = ["--steps", "6", "--seq", "32", "--batch", "2", "--eval-tokens", "128", "--save-every", "2", "--rank", "4",
         "--targets", "q_proj,v_proj", "--threads", "1"]  # pinned: sums over 1 or 2 threads round differently


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from lowbit.data import default_text

    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(default_text()[:20000])
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text):
    out = tmp_path_factory.mktemp("ft") / "run"
    code, output = run("finetune", "smollm2-135m", "--data", text, "--out", out, *SMALL)
    assert code == 0, output
    return out


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_finetune_writes_adapter_plot_and_summary(finished):
    assert {p.name for p in (finished / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert (finished / "loss.png").stat().st_size > 1000
    s = json.loads((finished / "summary.json").read_text())
    assert s["steps"] == 6 and len(s["losses"]) == 6 and all(map(lambda v: v == v, s["losses"]))
    assert 1 < s["ppl_before"] < 1000 and 1 < s["ppl_after"] < 1000
    assert s["trainable_params"] == sum(v.numel() for v in adapter(finished).values())
    assert any(v.abs().sum() > 0 for k, v in adapter(finished).items() if "lora_B" in k)  # it trained
    code, out = run("eval", "smollm2-135m", "--method", "nf4", "--adapter", finished / "adapter", "--tokens", 128,
                    "--window", 64, "--no-speed")
    assert code == 0 and "perplexity" in out, out


def test_killed_run_resumes_bit_identically(tmp_path, text, finished):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "finetune", "smollm2-135m", "--data", str(text),
                             "--out", str(out), *SMALL], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "checkpoint" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["step"] >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(progress.read_text())["step"]
    assert 2 <= step < 6 or (out / "summary.json").exists()
    # Resumed with another thread count, the run goes on with the one it started with, and says so.
    code, output = run("finetune", "smollm2-135m", "--data", text, "--out", out, *SMALL[:-1], "2")
    assert code == 0, output
    assert step == 6 or "resuming with 1 threads" in " ".join(output.split()), output
    a, b = adapter(out), adapter(finished)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "summary.json").read_text())["losses"] == json.loads((finished / "summary.json").read_text())["losses"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, text, finished):
    short = tmp_path / "short.txt"
    short.write_text("Too short to train on.")
    cases = [
        (["--data", short], "fewer than one training sequence"),
        (["--data", text, "--rank", "0"], "--rank must be >= 1"),
        (["--data", text, "--steps", "0"], "--steps must be >= 1"),
        (["--data", text, "--targets", "no_such_proj"], "no_such_proj"),
        (["--data", tmp_path / "missing.txt"], "not found"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, output = run("finetune", "smollm2-135m", *args, "--out", out, "--seq", "32", "--eval-tokens", "64")
        assert code == 2 and message in " ".join(output.split()) and output.count("error:") == 1, output
        assert output.lstrip().startswith("error:"), output  # nothing before the one error (rich may wrap it)
        assert not out.exists() or not any(out.iterdir()), args
    # Resuming into a folder trained with another rank, and an adapter of another shape in eval.
    code, output = run("finetune", "smollm2-135m", "--data", text, "--out", finished, *SMALL[:-4], "--rank", "8",
                       "--targets", "q_proj,v_proj")
    assert code == 2 and "another" in output, output
    code, output = run("eval", "smollm2-135m", "--adapter", finished / "adapter", "--tokens", 64, "--no-speed",
                       "--method", "int8")
    assert code == 0, output  # the same shapes: any base quantization takes it
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    cfg = json.loads((finished / "adapter" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    (bad / "adapter_model.safetensors").write_bytes((finished / "adapter" / "adapter_model.safetensors").read_bytes())
    code, output = run("eval", "smollm2-135m", "--adapter", bad, "--tokens", 64, "--no-speed")
    assert code == 2 and "does not fit" in output, output


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, text):
    out = tmp_path / "nan"
    code, output = run("finetune", "smollm2-135m", "--data", text, "--out", out, *SMALL[:-2], "--targets", "q_proj",
                       "--lr", "1e30", "--save-every", "1", "--optimizer", "adamw")
    assert code == 2 and "loss became" in output, output
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())  # complete, readable
    assert progress["step"] >= 1 and not (out / "summary.json").exists()


def test_patience_stops_after_evaluations_without_a_new_best_and_keeps_the_best_adapter(tmp_path, text, monkeypatch):
    import lowbit.app.finetune as ft

    scripted = iter([10.0, 9.0, 8.0, 8.5, 8.7, 99.0])  # before, then steps 1-4: the best at step 2
    monkeypatch.setattr(ft, "heldout_perplexity", lambda *a, **k: next(scripted))
    code, output = run("finetune", "smollm2-135m", "--data", text, "--out", tmp_path / "stop", *SMALL,
                       "--eval-every", "1", "--patience", "2")
    assert code == 0 and "best at step 2" in output, output
    s = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert s["stopped_at"] == 4 and s["steps"] == 4 and s["best_step"] == 2 and s["ppl_after"] == 8.0
    assert [e["ppl"] for e in s["evals"]] == [9.0, 8.0, 8.5, 8.7]
    monkeypatch.undo()
    code, output = run("finetune", "smollm2-135m", "--data", text, "--out", tmp_path / "two", *SMALL[2:],
                       "--steps", "2")  # the same batches, stopped at step 2
    assert code == 0, output
    best, two = adapter(tmp_path / "stop"), adapter(tmp_path / "two")
    assert best.keys() == two.keys() and all(torch.equal(best[k], two[k]) for k in best)
    code, output = run("finetune", "smollm2-135m", "--data", text, "--out", tmp_path / "bad", *SMALL, "--patience", "2")
    assert code == 2 and "--eval-every" in output, output
