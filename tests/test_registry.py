"""The format registry: a format defined in one file (tests/toy_format.py) works everywhere by name (issue 33)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import lowbit
import toy_format
from lowbit import registry
from lowbit.cli import app
from lowbit.nn import Linear4bit
from lowbit.plan import Plan
from test_checkpoint import IDS, logits, tiny_llama
from test_cli import tiny_model_dir  # noqa: F401 - the fixture: a tiny Llama folder with SmolLM2's tokenizer


def _expected_layer_output(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # the format's arithmetic written out here, not through its layer
    w = linear.weight.detach()
    sign = torch.where(w >= 0, 1.0, -1.0)
    return x @ (sign * w.abs().mean(1, keepdim=True)).t()


def test_a_registered_format_quantizes_by_config_and_by_name():
    base = tiny_llama()
    x = torch.randn(3, 64)
    q_proj = base.model.layers[0].self_attn.q_proj
    for config in (toy_format.SignConfig(), "toy-sign"):
        q = lowbit.quantize(copy.deepcopy(base), config, progress=False)
        layer = q.model.layers[0].self_attn.q_proj
        assert isinstance(layer, toy_format.SignLinear)
        with torch.no_grad():
            assert torch.allclose(layer(x), _expected_layer_output(q_proj, x), atol=1e-5)
    assert "toy-sign" in registry.method_names()
    assert lowbit.config.format_name(toy_format.SignConfig()) == "toy-sign"
    assert lowbit.config.config_from_dict(toy_format.SignConfig().to_dict()) == toy_format.SignConfig()


def test_a_registered_format_in_a_plan_saved_and_loaded_both_ways(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    plan = Plan(layers={n: "toy-sign" if i % 2 else "nf4" for i, n in enumerate(names)})
    q = lowbit.quantize(copy.deepcopy(base), plan, progress=False)
    kinds = {type(m) for m in q.modules()}
    assert {toy_format.SignLinear, Linear4bit} <= kinds
    before = logits(q)
    lowbit.save(q, tmp_path / "ck")
    assert torch.equal(logits(lowbit.load(tmp_path / "ck")), before)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")), before)


def test_a_registered_format_checks_its_values_on_load(tmp_path):
    q = lowbit.quantize(tiny_llama(), "toy-sign", progress=False)
    q.model.layers[0].mlp.up_proj.weight_bits[0, 0] = 2  # not a sign bit
    lowbit.save(q, tmp_path / "ck")
    with pytest.raises(lowbit.CheckpointError, match="weight_bits holds 2"):
        lowbit.load(tmp_path / "ck")


def test_the_command_takes_a_registered_format_by_name(tmp_path, tiny_model_dir):  # noqa: F811
    runner = CliRunner()
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--method", "toy-sign", "--out", str(out),
                            "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert isinstance(lowbit.load(out).model.layers[0].mlp.down_proj, toy_format.SignLinear)
    r = runner.invoke(app, ["compare", str(tiny_model_dir), "--methods", "fp32,toy-sign", "--tokens", "256",
                            "--no-speed", "--out", str(tmp_path / "cmp"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "toy-sign" in r.output
    r = runner.invoke(app, ["quantize", str(tiny_model_dir), "--method", "toy-sign", "--bits", "3", "--out",
                            str(tmp_path / "q2"), "--threads", "1"])
    assert r.exit_code == 2 and "--bits does not apply to toy-sign" in r.output
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "toy-sign" in r.output and "gptq" in r.output
