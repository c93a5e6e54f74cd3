"""Mixed-format models: plans (JSON) through quantize, save and load; quantized embeddings with tied heads."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import config_from_name, format_name
from lowbit.embeddings import quantize_embeddings
from lowbit.nn import HalfLinear, Int8Linear, IntLinear, Linear4bit, QuantEmbedding, SpQRLinear
from lowbit.nn.embedding import rows_of
from lowbit.plan import Plan
from test_checkpoint import IDS, logits, tiny_llama

MIXED = ["int8-weight", "nf4", "rtn3-g32", "gptq4-g32", "spqr3", "bfloat16", "float32"]
CALIB = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))


def _block_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def _mixed_plan(model, embeddings: str = "int8", head: str | None = None) -> Plan:
    layers = {n: MIXED[i % len(MIXED)] for i, n in enumerate(_block_linears(model))}
    if head:
        layers["lm_head"] = head
    return Plan(layers=layers, embeddings=embeddings)


@pytest.mark.parametrize("name,fields", [
    ("rtn4-g64", {"bits": 4, "group_size": 64}), ("gptq3-g32", {"bits": 3, "group_size": 32}),
    ("gptq3", {"bits": 3, "group_size": 128}), ("spqr4", {"bits": 4, "group_size": 16}),
])
def test_format_names_carry_bits_and_group(name, fields):
    c = config_from_name(name)
    assert {k: getattr(c, k) for k in fields} == fields
    assert format_name(c) == name


@pytest.mark.parametrize("bad", ["nf4-g64", "gptq5", "int83", "rtn4-g0", "float16"])
def test_unknown_format_names(bad):
    with pytest.raises(ValueError, match="unknown quantization method"):
        config_from_name(bad)


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4"])
def test_embedding_rows_equal_the_dequantized_table(fmt):
    emb = nn.Embedding(300, 64)
    q = QuantEmbedding.from_embedding(emb, fmt)
    ids = torch.randint(0, 300, (3, 9))
    table = q.rows.dequantize().float()
    assert torch.equal(q(ids), table[ids])
    assert torch.equal(rows_of(q.rows, ids[0]), table[ids[0]])
    err = (q(ids) - emb(ids)).abs().max() / emb.weight.abs().max()
    assert err < {"bfloat16": 0.01, "int8": 0.01, "int4": 0.15}[fmt]


@pytest.mark.parametrize("tied", [True, False])
def test_mixed_plan_round_trip(tmp_path, tied):
    base = tiny_llama(tied=tied)
    plan = _mixed_plan(base, "int4", head=None if tied else "rtn4-g32")
    q = lowbit.quantize(copy.deepcopy(base), plan, calibration=CALIB, progress=False)
    kinds = {type(m) for m in q.modules()}
    assert {Int8Linear, Linear4bit, IntLinear, SpQRLinear, HalfLinear, QuantEmbedding} <= kinds
    assert isinstance(q.model.layers[0].self_attn.q_proj, Int8Linear)
    assert type(q.model.layers[0].mlp.down_proj) is nn.Linear  # "float32": kept
    if tied:
        assert q.lm_head is q.model.embed_tokens.rows
    else:
        assert isinstance(q.lm_head, IntLinear) and q.lm_head.group_size == 32
    before = logits(q)
    lowbit.save(q, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "lowbit.json").read_text())
    assert manifest["quantization"]["method"] == "plan"
    assert manifest["layers"]["model.embed_tokens"]["type"] == "QuantEmbedding"
    assert bool(manifest["tied"]) == tied  # the table is stored once when the head is tied to it
    back = lowbit.load(tmp_path / "ck")
    assert torch.equal(logits(back), before)
    assert isinstance(back.lowbit_config, Plan) and back.lowbit_config.layers == plan.layers
    if tied:
        assert back.lm_head.weight_packed.data_ptr() == back.model.embed_tokens.rows.weight_packed.data_ptr()
    # a second save of the loaded model stores the same tensors
    lowbit.save(back, tmp_path / "ck2")
    assert torch.equal(logits(lowbit.load(tmp_path / "ck2")), before)


def test_plan_json_round_trip(tmp_path):
    plan = Plan(layers={"a.b": "gptq3-g64", "c": {"method": "int", "bits": 4, "group_size": 64}}, default="nf4",
                embeddings="bfloat16", notes={"budget_bits": 4.5})
    back = Plan.load(plan.save(tmp_path / "p.json"))
    assert back == plan
    assert back.needs_calibration() and not Plan(default="nf4").needs_calibration()


def test_default_fills_the_layers_left_out():
    base = tiny_llama()
    names = _block_linears(base)
    q = lowbit.quantize(copy.deepcopy(base), Plan(layers={names[0]: "int8-weight"}, default="rtn4-g32"), progress=False)
    assert isinstance(q.get_submodule(names[0]), Int8Linear)
    assert all(isinstance(q.get_submodule(n), IntLinear) for n in names[1:])
    assert isinstance(q.lm_head, nn.Linear) and not isinstance(q.model.embed_tokens, QuantEmbedding)


@pytest.mark.parametrize("plan,calibration,message", [
    (lambda names: Plan(layers={names[0]: "nf4"}), None, "leaves out"),
    (lambda names: Plan(layers={"model.layers.9.mlp.up_proj": "nf4"}, default="nf4"), None, "lacks"),
    (lambda names: Plan(layers={"lm_head": "int8-weight"}, default="nf4"), None, "tied to the embeddings"),
    (lambda names: Plan(default="gptq4-g32"), None, "needs calibration"),
])
def test_plans_that_do_not_fit_are_one_error(plan, calibration, message):
    base = tiny_llama()
    snapshot = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match=message) as e:
        lowbit.quantize(base, plan(_block_linears(base)), calibration=calibration, progress=False)
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, snapshot[k]) for k, v in base.state_dict().items())  # left as it was


def test_calibrated_head_is_refused():
    base = tiny_llama(tied=False)
    with pytest.raises(ValueError, match="outside the model's blocks"):
        lowbit.quantize(base, Plan(layers={"lm_head": "gptq4-g32"}, default="nf4"), calibration=CALIB, progress=False)


@pytest.mark.parametrize("make,message", [
    (lambda: Plan(layers={"x": "nf5"}), "layer x: unknown quantization method"),
    (lambda: Plan(default="int16"), "default: unknown"),
    (lambda: Plan(embeddings="nf4"), "embeddings must be one of"),
    (lambda: Plan.from_dict({"format": "other"}), "not a lowbit plan"),
    (lambda: Plan.from_dict({"layers": {}, "extra": 1}), "no field"),
])
def test_bad_plans(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_damaged_plan_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the plan"):
        Plan.load(path)


def test_embeddings_errors():
    base = tiny_llama()
    with pytest.raises(ValueError, match="embedding format must be one of"):
        quantize_embeddings(base, "nf4")
    quantize_embeddings(base, "int8")
    with pytest.raises(ValueError, match="already"):
        quantize_embeddings(base, "int4")


def test_scaled_embeddings_are_refused_not_stored_without_their_scale():
    # Gemma multiplies its rows by sqrt(hidden) in the embedding's forward: a table alone would drop that.
    import transformers

    config = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = transformers.GemmaForCausalLM(config)
    with pytest.raises(ValueError, match="GemmaTextScaledWordEmbedding.*a scale"):
        quantize_embeddings(model, "int8")
    assert type(model.get_input_embeddings()).__name__ == "GemmaTextScaledWordEmbedding"


def test_real_model_int8_embeddings(smollm, tmp_path):
    """SmolLM2-135M with its tied 113 MB fp32 table in int8 rows: a quarter of the bytes, the same greedy answer."""
    model, tok = smollm
    q = quantize_embeddings(copy.deepcopy(model), "int8")
    before, after = lowbit.memory_report(model)["total_bytes"], lowbit.memory_report(q)["total_bytes"]
    table = model.get_input_embeddings().weight.numel()
    assert before - after > 0.7 * table * 4  # 4 -> 1 byte a weight, plus one scale a row
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = lowbit.generate(q, ids, max_new_tokens=3)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    lowbit.save(q, tmp_path / "ck")
    back = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_opens_a_mixed_checkpoint(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tied=tied)
    names = _block_linears(base)
    plan = Plan(layers={n: ["nf4", "int8-weight", "rtn3-g32"][i % 3] for i, n in enumerate(names)}, embeddings="int8")
    q = lowbit.quantize(copy.deepcopy(base), plan, progress=False)
    lowbit.save(q, tmp_path / "ck")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.equal(logits(back), logits(q))
    assert isinstance(back.model.embed_tokens, QuantEmbedding)
    assert (back.lm_head is back.model.embed_tokens.rows) == tied


def test_each_calibrated_layer_keeps_its_own_gptq_settings():
    """plan._calibrate took token_clip and true_sequential from the first calibrated config for every layer: a plan
    mixing GPTQ settings silently lost all but the first (issue 33)."""
    from lowbit.config import GPTQConfig

    base = tiny_llama()
    names = _block_linears(base)
    clipped = {"method": "gptq", "bits": 4, "group_size": 32, "token_clip": 1.0}  # caps every token at the median
    plain = {"method": "gptq", "bits": 4, "group_size": 32, "token_clip": None}
    down = "model.layers.0.mlp.down_proj"  # its inputs' token norms vary (those of q/k/v are RMS-normalised)
    layers = {n: clipped if n == down else plain for n in names}
    layers = {down: clipped, **layers}  # the clipped config first: the one the old code applied to every layer
    mixed = lowbit.quantize(copy.deepcopy(base), Plan(layers=layers), calibration=CALIB, progress=False)
    uniform = {c["token_clip"]: lowbit.quantize(copy.deepcopy(base), GPTQConfig(bits=4, group_size=32,
                                                                                token_clip=c["token_clip"]),
                                                calibration=CALIB, progress=False) for c in (clipped, plain)}

    def codes(model, name):
        return model.get_submodule(name).weight_packed

    assert torch.equal(codes(mixed, down), codes(uniform[1.0], down))
    assert not torch.equal(codes(uniform[1.0], down), codes(uniform[None], down))  # the setting matters here
    for n in names[:6]:  # block 0's other layers: Hessians of the float block, unclipped
        assert torch.equal(codes(mixed, n), codes(uniform[None], n)), n


def test_true_sequential_per_layer():
    """A layer that asks for true_sequential sees the groups before it quantized; the others the float block."""
    from lowbit.calibrate.sequential import quantize_sequential

    def zeroing(record):
        def quantize(name, module, H):  # once v_proj is zero, o_proj's true inputs are zero too
            record[name] = H
            out = copy.deepcopy(module)
            out.weight.data.zero_()
            return out
        return quantize

    model, ids, hs = tiny_llama(), CALIB, {}
    for mode in (True, False, "o only"):
        record = {}
        ts = (lambda name: name.endswith("o_proj")) if mode == "o only" else mode
        quantize_sequential(copy.deepcopy(model), ids, zeroing(record), progress=False, true_sequential=ts)
        hs[mode] = record
    o, down = "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"
    assert hs["o only"][o].abs().max() == 0 and hs[True][o].abs().max() == 0
    assert torch.equal(hs["o only"][down], hs[False][down]) and hs[False][down].abs().max() > 0
