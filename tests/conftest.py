"""Shared fixtures: the project cache folder, and the real model loaded once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("LOWBIT_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M (fp32) and its tokenizer; the test must not modify the model."""
    from lowbit.app.models import load_default_model

    return load_default_model()


@pytest.fixture(scope="session")
def real_weights(smollm):
    """A few real weight matrices of SmolLM2-135M (attention and MLP shapes)."""
    model, _ = smollm
    layer = model.model.layers[3]
    return {
        "q_proj": layer.self_attn.q_proj.weight.detach().clone(),
        "k_proj": layer.self_attn.k_proj.weight.detach().clone(),
        "down_proj": layer.mlp.down_proj.weight.detach().clone(),
    }


def forced_paths() -> list[tuple[str, str]]:
    """Every (kernel build, bf16 prefill GEMM dtype) this CPU can run: each build it supports, each GEMM dtype."""
    from lowbit.kernels import cpu_ext

    return [(v, g) for v in cpu_ext.variants() if cpu_ext.supported(v) for g in ("fp32", "bf16")]


@pytest.fixture(params=forced_paths(), ids=lambda p: f"{p[0]}-gemm_{p[1]}")
def forced_path(request):
    """Runs the test once per forced path (``pytestmark = pytest.mark.usefixtures("forced_path")``), so a machine
    without AMX or VNNI also tests the paths such CPUs choose, and the other way round."""
    from lowbit import kernels

    with kernels.force(kernels=request.param[0], gemm=request.param[1]):
        assert kernels.fast() is not None or os.environ.get("LOWBIT_NO_EXT"), "kernel build failed"
        yield request.param


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
