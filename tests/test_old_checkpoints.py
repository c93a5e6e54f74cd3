"""Checkpoints written by an older lowbit (tests/fixtures/checkpoints/, made at commit bf8d976 by
tests/fixtures/make_old_checkpoints.py) load with today's code through lowbit.load and through transformers'
from_pretrained: every stored tensor is in the model bit for bit, and the logits are the ones they gave when saved.

Logits are computed as the fixtures' were: plain-torch reference kernels, one thread, no grad. They were made on
an AMD EPYC (AVX-512); torch's float GEMMs may round differently on another CPU, so there the logits must agree to
float rounding (1e-5) and the tensors, which no CPU rounds, exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lowbit
from lowbit import kernels

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
NAMES = ("nf4", "fp4", "int4", "int8", "int8-absmax", "int8-weight", "ternary", "rtn3", "gptq4", "spqr3", "mixed")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def expected(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    stored = load_file(str(FIXTURES / name / "logits.safetensors"))
    return stored["ids"], stored["logits"]


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), kernels.force(kernels="reference"):
        return model(ids).logits


def same_logits(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.equal(got, want) or torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def stored_tensors_are_the_models(model: torch.nn.Module, directory: Path) -> None:
    state = model.state_dict()
    for shard in directory.glob("model-*.safetensors"):
        for name, t in load_file(str(shard)).items():
            assert torch.equal(state[name], t), f"{directory.name}: {name} differs from the stored tensor"


def listing(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


def test_fixtures_are_all_there():
    made = json.loads((FIXTURES / "MADE_BY.json").read_text())
    assert made["lowbit_commit"].startswith("bf8d976")
    assert tuple(made["fixtures"]) == NAMES
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(NAMES)


LOADERS = {"lowbit.load": lowbit.load, "from_pretrained": AutoModelForCausalLM.from_pretrained}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_loads_to_its_logits(name, loader, one_thread):
    directory = FIXTURES / name
    before = listing(directory)
    ids, want = expected(name)
    model = LOADERS[loader](directory)
    stored_tensors_are_the_models(model, directory)
    got = logits_of(model, ids)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert same_logits(got, want), f"{name}: max |diff| {(got - want).abs().max().item():.3g}"
    assert listing(directory) == before  # loading wrote nothing into the fixture
