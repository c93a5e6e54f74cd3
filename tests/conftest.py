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
    from lowbit.models import load_default_model

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


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
