"""QLoRA on torch.distributed (2 gloo processes on the CPU, torchrun): DDP and FSDP give the single-process losses,
FSDP holds about half the base per process, a sharded run resumes, bad resumes and dead workers end with errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
SCRIPT = HERE / "distributed_finetune.py"


def _run(src: Path, out: Path, parallel: str, nproc: int, env: dict | None = None, timeout: float = 240):
    cmd = [sys.executable, str(SCRIPT), str(src), str(out), parallel]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] + cmd[1:]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment)


def _result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm):
    """A random 2-layer Llama with SmolLM2's tokenizer, fine-tuned 20 steps by 1 process, DDP and FSDP."""
    import transformers

    from lowbit.app.models import _converted_dir

    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "tiny")
    transformers.AutoTokenizer.from_pretrained(str(_converted_dir())).save_pretrained(root / "tiny")
    out = {"root": root, "src": root / "tiny"}
    for name, parallel, nproc in (("single", "ddp", 1), ("ddp", "ddp", 2), ("fsdp", "fsdp", 2)):
        out[name] = _result(_run(root / "tiny", root / name, parallel, nproc))
    return out


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_ddp_and_fsdp_losses_equal_the_single_process_run(runs):
    single = runs["single"]["losses"]
    assert len(single) == 20 and runs["ddp"]["processes"] == 2
    assert _rel(runs["ddp"]["losses"], single) < 1e-4
    assert _rel(runs["fsdp"]["losses"], single) < 1e-3


def test_fsdp_holds_about_half_the_model_per_process(runs):
    whole = runs["single"]["process_memory"][0]["model_bytes"]
    ddp = [m["model_bytes"] for m in runs["ddp"]["process_memory"]]
    fsdp = [m["model_bytes"] for m in runs["fsdp"]["process_memory"]]
    assert ddp == [whole, whole]
    assert all(0.45 * whole < b < 0.6 * whole for b in fsdp), (fsdp, whole)


def test_fsdp_run_resumes_where_it_stopped(runs):
    out = runs["root"] / "fsdp-resumed"
    first = _result(_run(runs["src"], out, "fsdp", 2, {"STEPS": "10"}))
    assert len(first["losses"]) == 10
    second = _result(_run(runs["src"], out, "fsdp", 2))
    assert _rel(second["losses"], runs["fsdp"]["losses"]) < 1e-5


def test_resume_with_another_number_of_processes_is_refused(runs):
    out = runs["root"] / "fsdp-10"
    _result(_run(runs["src"], out, "fsdp", 2, {"STEPS": "10"}))
    proc = _run(runs["src"], out, "fsdp", 1)
    assert proc.returncode != 0
    assert "written by 2 process(es), this run has 1: resume with --nproc 2" in proc.stderr


def test_a_dying_process_ends_the_run_with_an_error_not_a_hang(runs):
    t = time.perf_counter()
    proc = _run(runs["src"], runs["root"] / "dies", "ddp", 2, {"DIE_RANK": "1", "DIE_STEP": "3"}, timeout=180)
    assert proc.returncode != 0
    assert time.perf_counter() - t < 150
    assert "exitcode  : 9" in proc.stderr or "exit code 9" in proc.stderr.lower(), proc.stderr[-2000:]


def test_finetune_refuses_a_batch_that_does_not_split_over_the_processes(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    text = tmp_path / "t.txt"
    text.write_text("some text " * 100)
    result = CliRunner().invoke(app, ["finetune", "no-such-model", "--data", str(text), "--batch", "3", "--nproc", "2",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--batch 3 must split evenly over --nproc 2 processes" in result.output
