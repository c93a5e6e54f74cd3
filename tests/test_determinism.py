"""Quantization is deterministic: the same model and config give the same bytes at any thread count, in memory or
streamed, and on every kernel path (issue 32 item 5: NF4 + double quantization of a 2048-wide model wrote 120
different tensors at 1 and at 2 threads, so a busy and an idle machine wrote different checkpoints)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit import functional as F
from lowbit import kernels

ROOT = Path(__file__).resolve().parents[1]

# Quantizes a 2048-wide random Llama (q_proj and o_proj of 4M elements: torch splits their reductions across threads) by
# METHOD in memory or streamed from SRC, with THREADS threads, into OUT.
SCRIPT = """
import sys, torch
threads, method, src, out, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
torch.set_num_threads(threads)
import lowbit
from lowbit.app.methods import method_config
from transformers import AutoModelForCausalLM
config = method_config(method)
calib = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)) if method in ("gptq", "spqr") else None
if mode == "stream":
    lowbit.quantize_checkpoint(src, out, config, calibration=calib, progress=False)
else:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    lowbit.save(lowbit.quantize(model, config, calibration=calib, progress=False), out)
"""


def _random_folder(root: Path, hidden: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=16, num_key_value_heads=1, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    # q_proj and o_proj are 2048 x 2048: 65536 NF4 blocks, whose double-quantization mean torch would split
    return _random_folder(tmp_path_factory.mktemp("wide") / "src", 2048)


@pytest.fixture(scope="module")
def narrow_folder(tmp_path_factory):
    # GPTQ's products and Cholesky factors at 512 columns: multi-threaded GEMMs, a quick column sweep
    return _random_folder(tmp_path_factory.mktemp("narrow") / "src", 512)


def _quantize(tmp: Path, folder: Path, method: str, threads: int, mode: str) -> dict[str, str]:
    out = tmp / f"{method}-{mode}-{threads}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", SCRIPT, str(threads), method, str(folder), str(out), mode], check=True,
                   env=env, capture_output=True)
    manifest = json.loads((out / "lowbit.json").read_text())
    return {name: s["sha256"] for s in manifest["shards"] for name in s["tensors"]}  # tensors -> their shard's hash


@pytest.mark.parametrize("method", ["nf4", "ternary", "gptq"])
def test_same_bytes_at_one_and_two_threads(tmp_path, wide_folder, narrow_folder, method):
    folder = narrow_folder if method == "gptq" else wide_folder
    one = _quantize(tmp_path, folder, method, 1, "memory")
    two = _quantize(tmp_path, folder, method, 2, "memory")
    assert one == two


def test_streamed_at_two_threads_equals_in_memory_at_one(tmp_path, wide_folder):
    assert _quantize(tmp_path, wide_folder, "nf4", 2, "stream") == _quantize(tmp_path, wide_folder, "nf4", 1, "memory")


@pytest.mark.parametrize("numel", [1000, 32767, 32768, 700_001])
def test_whole_tensor_means_do_not_change_with_threads(numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).abs()
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((F.double_quantize(x).offset, F.quantize_ternary(x - 0.5)[1]))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    exact = x.double().mean()  # the mean itself: float32 rounding of it, not a drifting float32 sum
    assert abs(float(results[0][0]) - float(exact)) <= 2e-7 * float(exact)


def test_same_bytes_on_every_kernel_path():
    from test_checkpoint import tiny_llama
    from lowbit.kernels import cpu_ext

    paths = ["reference"] + [v for v in cpu_ext.variants() if cpu_ext.supported(v)]
    made = {}
    for path in paths:
        with kernels.force(kernels=path):
            for method in (lowbit.NF4Config(), lowbit.TernaryConfig(), lowbit.Int8Config()):
                q = lowbit.quantize(tiny_llama(), method, progress=False)
                made.setdefault(type(method).__name__, []).append(q.state_dict())
    for name, states in made.items():
        for state in states[1:]:
            assert all(torch.equal(state[k], states[0][k]) for k in states[0]), name
