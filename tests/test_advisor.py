"""The precision advisor: sensitivities measured per layer and format, plans within budgets, the command."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import lowbit
from lowbit.analysis import sensitivity as S
from lowbit.app.advisor import advise, bounds, frontier, uniform
from lowbit.embeddings import quantize_embeddings
from lowbit.nn import QuantLinear
from lowbit.nn.base import replace_module
from lowbit.quantize import build_layer
from lowbit.config import config_from_name
from test_checkpoint import tiny_llama
from test_cli import run, tiny_model_dir  # noqa: F401 - a fixture

FORMATS = ("int8-weight", "nf4", "rtn3-g32", "gptq3-g32", "spqr3")
CALIB = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def measured():
    model = tiny_llama()
    return model, S.measure_sensitivity(model, CALIB, FORMATS, kl=True, progress=False)


def _kl(reference, model, ids) -> float:
    with torch.no_grad():
        p = reference(ids).logits.log_softmax(-1)
        q = model(ids).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("layer,fmt", [("model.layers.0.mlp.down_proj", "rtn3-g32"),
                                       ("model.layers.1.self_attn.v_proj", "nf4"),
                                       ("model.layers.1.mlp.gate_proj", "rtn3-g32")])
def test_kl_equals_a_whole_forward_with_the_layer_quantized(measured, layer, fmt):
    """The runner skips the blocks before the layer's (their cached outputs stand in); a whole forward must agree."""
    model, sens = measured
    q = copy.deepcopy(model)
    replace_module(q, layer, build_layer(q.get_submodule(layer), config_from_name(fmt)))
    direct = _kl(model, q, CALIB)
    assert direct > 1e-6  # well above float rounding
    assert sens.layers[layer][fmt]["kl"] == pytest.approx(direct, rel=1e-3, abs=1e-9)


def test_embedding_kl_is_a_whole_forward(measured):
    model, sens = measured
    q = quantize_embeddings(copy.deepcopy(model), "int4")
    assert sens.embeddings["int4"]["kl"] == pytest.approx(_kl(model, q, CALIB), rel=1e-3)
    assert sens.embeddings["float32"]["kl"] == 0


def test_entries_and_byte_accounting(measured):
    model, sens = measured
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert sorted(sens.layers) == sorted(layers)
    for name, formats in sens.layers.items():
        assert set(formats) == set(FORMATS) | {"float32"}
        assert formats["float32"]["kl"] == formats["float32"]["fisher"] == 0
        for fmt in FORMATS:
            built = build_layer(model.get_submodule(name), config_from_name(fmt)) if "gptq" not in fmt and "spqr" not in fmt else None
            if built is not None:
                assert formats[fmt]["bytes"] == built.stored_bits() // 8
            assert formats[fmt]["kl"] >= -1e-7 and formats[fmt]["output"] > 0 and formats[fmt]["fisher"] >= 0
    total = lowbit.memory_report(model)["total_bytes"]
    assert sens.fixed_bytes + sum(f["float32"]["bytes"] for f in sens.layers.values()) \
        + sens.embeddings["float32"]["bytes"] == total


def test_cache_answers_the_second_time(tmp_path, monkeypatch):
    model = tiny_llama()
    first = S.measure_sensitivity(model, CALIB, ("nf4",), kl=False, cache=tmp_path, progress=False)
    monkeypatch.setattr(S, "_Runner", None)  # measuring again would fail
    again = S.measure_sensitivity(model, CALIB, ("nf4",), kl=False, cache=tmp_path, progress=False)
    assert again == first
    with pytest.raises(TypeError):  # other calibration tokens: another key, measured
        S.measure_sensitivity(model, CALIB[:2], ("nf4",), kl=False, cache=tmp_path, progress=False)


@pytest.mark.parametrize("cost", ["kl", "fisher"])
def test_plans_fit_their_budget_and_cost_falls_as_it_grows(measured, cost):
    _, sens = measured
    plans = frontier(sens, [3.5, 4.0, 4.5, 5.0, 6.0, 8.0, 12.0], cost)
    assert plans
    for a in plans:
        assert a.bits <= a.plan.notes["budget_bits"] + 1e-9
        assert a.cost == pytest.approx(sum(c.cost for c in a.choices.values()) + sens.embeddings["float32"]["kl"])
    costs = [a.cost for a in plans]
    assert costs == sorted(costs, reverse=True)
    # at the size of a uniform format, the advised plan is predicted no worse than it
    for fmt in FORMATS:
        u = uniform(sens, fmt, cost)
        if u.bits >= bounds(sens, cost, "float32")["min_bits"]:
            assert advise(sens, bits=u.bits + 1e-6, cost=cost).cost <= u.cost + 1e-12


def test_bytes_budget_chooses_the_embeddings(measured):
    _, sens = measured
    b = bounds(sens, "kl", None)
    tight = advise(sens, budget=int(b["min_bytes"] + 0.05 * (b["max_bytes"] - b["min_bytes"])), cost="kl")
    assert tight.model_bytes <= tight.plan.notes["budget_bytes"]
    assert tight.plan.embeddings != "float32"


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=1.0), "outside what the formats reach: from"),
    (dict(bits=32.0), "outside what the formats reach"),
    (dict(budget=10), "MB is outside"),
    (dict(budget=10**12), "full-precision model"),
    (dict(), "give one budget"),
])
def test_budgets_out_of_reach(measured, kwargs, message):
    _, sens = measured
    with pytest.raises(ValueError, match=message) as e:
        advise(sens, cost="kl", **kwargs)
    assert "\n" not in str(e.value)


def test_advised_plan_quantizes_to_its_predicted_bytes(measured):
    model, sens = measured
    a = advise(sens, bits=4.5, cost="kl")
    q = lowbit.quantize(copy.deepcopy(model), a.plan, calibration=CALIB, progress=False)
    # the knapsack's bytes are the stored bytes of the layers quantize builds (float32 ones: 32 bits a weight)
    stored = sum(m.stored_bits() if isinstance(m, QuantLinear) else 32 * m.weight.numel()
                 for n, m in q.named_modules() if n in a.plan.layers)
    assert stored / sens.linear_params == pytest.approx(a.bits, rel=1e-9)
    assert json.loads(a.plan.to_json())["layers"] == a.plan.layers


def test_advise_and_quantize_by_plan_through_the_cli(tmp_path, tiny_model_dir):
    plan_path = tmp_path / "plan.json"
    code, out = run("advise", tiny_model_dir, "--bits", 5, "--tokens", 256, "--calib-samples", 2, "--calib-len", 32,
                    "--out", plan_path)
    assert code == 0, out
    assert "predicted" in out and "measured" in out and "model.layers.1.mlp.down_proj" in out
    assert (tmp_path / "plan-frontier.png").stat().st_size > 10_000
    plan = json.loads(plan_path.read_text())
    assert len(plan["layers"]) == 14 and plan["notes"]["bits"] <= 5
    code, out = run("quantize", tiny_model_dir, "--plan", plan_path, "--embeddings", "int8", "--out", tmp_path / "q")
    assert code == 0, out
    manifest = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert manifest["quantization"]["method"] == "plan"
    assert manifest["layers"]["model.embed_tokens"] == {"type": "QuantEmbedding", "num_embeddings": 49152,
                                                        "embedding_dim": 64, "format": "int8"}
    code, out = run("eval", tmp_path / "q", "--tokens", 64, "--no-speed")
    assert code == 0 and "plan checkpoint" in out, out
    # uniform method with its embeddings in 4-bit rows
    code, out = run("quantize", tiny_model_dir, "--method", "nf4", "--embeddings", "int4", "--out", tmp_path / "e")
    assert code == 0, out
    assert json.loads((tmp_path / "e" / "lowbit.json").read_text())["layers"]["model.embed_tokens"]["format"] == "int4"


@pytest.mark.parametrize("args,message", [
    (("--tokens", 256), "give one budget"),
    (("--bits", 4, "--budget", "1MB"), "give one budget"),
    (("--budget", "lots"), "--budget must be a size"),
    (("--bits", 1.5, "--tokens", 256, "--calib-samples", 1, "--calib-len", 16), "outside what the formats reach"),
    (("--budget", "1KB", "--tokens", 256, "--calib-samples", 1, "--calib-len", 16), "outside what the formats reach"),
    (("--bits", 4, "--cost", "mse"), "--cost must be fisher or kl"),
    (("--bits", 4, "--tokens", 256, "--calib-len", 10**6), "calibration text too short"),
    (("--bits", 4, "--tokens", 256, "--calib-samples", 1, "--calib-len", 16, "QUANTIZED"), "quantized already"),
])
def test_advise_bad_input(tiny_model_dir, tmp_path, args, message):
    model = tiny_model_dir
    if "QUANTIZED" in args:  # a lowbit checkpoint as MODEL
        args, model = args[:-1], tmp_path / "q"
        assert run("quantize", tiny_model_dir, "--method", "nf4", "--out", model)[0] == 0
    code, out = run("advise", model, *args, "--out", tmp_path / "p.json")
    assert code == 2 and message in out and "Traceback" not in out, out


@pytest.mark.parametrize("plan,extra,message", [
    ({"format": "lowbit-plan", "layers": {"model.layers.0.mlp.up_proj": "nf4"}}, (), "leaves out"),
    ({"format": "lowbit-plan", "layers": {"nope": "nf4"}, "default": "nf4"}, (), "lacks"),
    ({"format": "lowbit-plan", "layers": {}, "default": "nf9"}, (), "unknown quantization method"),
    ({"format": "lowbit-plan", "default": "nf4"}, ("--method", "int8"), "drop --method"),
    ({"format": "lowbit-plan", "default": "nf4"}, ("--embeddings", "fp8"), "--embeddings must be one of"),
])
def test_quantize_bad_plans(tiny_model_dir, tmp_path, plan, extra, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    code, out = run("quantize", tiny_model_dir, "--plan", path, *extra, "--out", tmp_path / "q")
    assert code == 2 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "q").exists()


def test_untied_head_is_a_candidate_of_a_bytes_budget():
    model = tiny_llama(tied=False)
    sens = S.measure_sensitivity(model, CALIB, ("nf4", "rtn3-g32"), kl=False, progress=False)
    assert set(sens.head) == set(S.HEAD_CANDIDATES)
    q = copy.deepcopy(model)
    q.lm_head = build_layer(q.lm_head, config_from_name("rtn4-g64"))
    assert sens.head["rtn4-g64"]["kl"] == pytest.approx(_kl(model, q, CALIB), rel=1e-3)
    total = lowbit.memory_report(model)["total_bytes"]
    assert sens.fixed_bytes + sum(f["float32"]["bytes"] for f in sens.layers.values()) \
        + sens.embeddings["float32"]["bytes"] + sens.head["float32"]["bytes"] == total
    b = bounds(sens, "fisher", None)
    a = advise(sens, budget=int(b["min_bytes"] + 0.02 * (b["max_bytes"] - b["min_bytes"])))
    assert a.plan.layers.get("lm_head") in ("bfloat16", "int8-weight", "rtn4-g64")
    built = lowbit.quantize(copy.deepcopy(model), a.plan, progress=False)
    assert lowbit.memory_report(built)["total_bytes"] == a.model_bytes <= a.plan.notes["budget_bytes"]
    # a bits budget keeps the head in float32 and counts it in the model's bytes
    kept = advise(sens, bits=4.0)
    assert "lm_head" not in kept.plan.layers
    assert lowbit.memory_report(lowbit.quantize(copy.deepcopy(model), kept.plan, progress=False))["total_bytes"] \
        == kept.model_bytes
