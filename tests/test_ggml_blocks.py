"""llama.cpp's block types in lowbit (issue 35): ggml's rounding bit for bit, the layouts read by the gguf package,
GPTQ on each type's grid, BlockLinear through checkpoints, and GGUF files holding the calibrated codes as they are."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize
from hypothesis import given, settings, strategies as st

import lowbit
from lowbit.calibrate.gptq_blocks import gptq_blocks
from lowbit.formats import ggml
from lowbit.interop.gguf import load_gguf, read
from lowbit.interop.gguf_export import export_gguf
from lowbit.nn import BlockLinear
from lowbit.plan import Plan
from test_checkpoint import logits, tiny_llama
from test_cli import run, tiny_model_dir  # noqa: F401 - the fixture: a tiny Llama folder with SmolLM2's tokenizer
from test_gguf import tiny_model, tok  # noqa: F401 - tok: the fixture, a 320-token BPE tokenizer

REFERENCE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # the types the gguf package quantizes too


def _kind(name: str):
    return getattr(GGMLQuantizationType, name.upper())


def _weights(seed: int, rows: int = 24, cols: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
    w[0, :32] = 0  # a block of zeros
    w[1, 32:64] = 0.25  # a constant block
    w[2, 7] = 60.0  # an outlier that sets its block's scale
    w[3, 64:96] = -w[3, 64:96].abs()  # one-signed blocks
    return w


@pytest.mark.parametrize("name", REFERENCE_TYPES)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_reference_rounding_is_the_gguf_package_bit_for_bit(name, seed):
    w = _weights(seed)
    ours = ggml.pack(ggml.reference(ggml.block_type(name), w)).numpy()
    assert np.array_equal(ours, quantize(w.numpy(), _kind(name)))


@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_layouts_read_back_and_read_by_the_gguf_package(name):
    t = ggml.block_type(name)
    w = _weights(1)
    blocks = ggml.search(t, w)
    data = ggml.pack(blocks)
    assert data.shape == (w.shape[0], w.shape[1] // 32 * t.bytes)
    back = ggml.unpack(t, data, w.shape[1])
    assert torch.equal(back.codes, blocks.codes) and torch.equal(back.d, blocks.d)
    assert (back.m is None) == (blocks.m is None) and (back.m is None or torch.equal(back.m, blocks.m))
    # the gguf package's decoder (ggml's layouts, written independently) reads the same weights
    assert np.array_equal(dequantize(data.numpy(), _kind(name)), blocks.dequantize().numpy())
    assert blocks.codes.min() >= t.qmin and blocks.codes.max() <= t.qmax


@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_the_weighted_search_loses_no_more_than_plain_rounding(name):
    t = ggml.block_type(name)
    w = _weights(2, rows=64, cols=256)
    power = torch.rand(256, generator=torch.Generator().manual_seed(3)) ** 4 * 10  # a few inputs matter most
    imp = ggml.importance(w, power)
    searched = ggml.search(t, w, power).dequantize()
    if name != "iq4_nl":  # the plain candidate: ggml's reference rounding
        plain = ggml.reference(t, w).dequantize()
    else:  # IQ4_NL's unsearched start: the largest weight on the grid's end, d = max / -127
        x = w.reshape(-1, 32)
        d = (x.gather(1, x.abs().argmax(1, keepdim=True)) / -127).to(torch.float16).float()
        plain = ggml.grid_value(t, ggml.nearest(t, x, d, None), d, None).reshape(w.shape)
    assert (imp * (searched - w) ** 2).sum() <= (imp * (plain - w) ** 2).sum()


def test_unknown_types_and_shapes_are_refused():
    with pytest.raises(ValueError, match="unknown block type 'q3_k'"):
        ggml.block_type("q3_k")
    with pytest.raises(ValueError, match="multiple of 32"):
        ggml.reference(ggml.block_type("q4_0"), torch.zeros(4, 48))
    with pytest.raises(ValueError, match="multiple of 32; this layer has 48"):
        BlockLinear(48, 8, block_type="q4_0")
    odd = torch.nn.Sequential(torch.nn.Linear(48, 8))
    with pytest.raises(ValueError, match="q4_0 takes rows whose length is a multiple of 32; this layer has 48"):
        lowbit.quantize(odd, lowbit.nn.ggml.BlockConfig(block_type="q4_0", skip=()), progress=False)


@pytest.mark.parametrize("name", ["q4_0", "q5_1", "iq4_nl"])
def test_gptq_on_a_block_grid_beats_rounding_with_the_same_scales(name):
    # Correlated inputs: GPTQ's compensation lowers the output error ||X W^T - X Q^T|| that rounding leaves.
    g = torch.Generator().manual_seed(0)
    t = ggml.block_type(name)
    x = torch.randn(2048, 128, generator=g) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=g))
    w = torch.randn(48, 128, generator=g)
    H = 2 * x.t() @ x / x.shape[0]
    q = gptq_blocks(w, H, t, act_order=True)
    rounded = ggml.Blocks(t, ggml.nearest(t, w, q.d.repeat_interleave(32, 1), None if q.m is None else
                                          q.m.repeat_interleave(32, 1)).to(torch.uint8), q.d, q.m)
    err = lambda b: float(((x @ (b.dequantize() - w).t()) ** 2).mean())  # noqa: E731
    assert err(q) < 0.8 * err(rounded)
    assert q.codes.min() >= t.qmin and q.codes.max() <= t.qmax


@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_block_linear_through_checkpoints(tmp_path, name):
    from transformers import AutoModelForCausalLM

    model = lowbit.quantize(tiny_llama(), name, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, BlockLinear) and layer.block_type == name
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ layer.dequantize().t(), atol=1e-5)
    before = logits(model)
    lowbit.save(model, tmp_path / "ck")
    assert torch.equal(logits(lowbit.load(tmp_path / "ck")), before)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")), before)


def test_a_damaged_scale_is_refused_on_load(tmp_path):
    model = lowbit.quantize(tiny_llama(), "q4_0", progress=False)
    model.model.layers[0].mlp.up_proj.weight_blocks[0, :2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # fp16 inf
    lowbit.save(model, tmp_path / "ck")
    with pytest.raises(lowbit.CheckpointError, match="scales"):
        lowbit.load(tmp_path / "ck")


@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_gptq_codes_go_into_the_gguf_file_as_they_are(tmp_path, tok, name):  # noqa: F811
    base = tiny_model()
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    model = lowbit.quantize(copy.deepcopy(base), f"gptq-{name}", calibration=ids, progress=False)
    path = tmp_path / "g.gguf"
    report = export_gguf(model, tok, path, name, progress=False)
    assert report["from_codes"] == 14
    tensors = {t.name: t for t in read(path).tensors}
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type.name == name.upper()
    layer = model.model.layers[0].mlp.down_proj
    assert np.array_equal(np.asarray(down.data).reshape(layer.out_features, -1), layer.weight_blocks.numpy())
    back, _ = load_gguf(path, progress=False)  # llama.cpp's layout read back (q/k rows unpermuted): the same weights
    mine = {n: m for n, m in model.named_modules() if isinstance(m, BlockLinear)}
    compared = [n for n, _ in back.named_modules() if n in mine]
    assert len(compared) == len(mine) == 14
    for n, m in back.named_modules():
        if n in mine:
            w = m.dequantize() if isinstance(m, lowbit.nn.QuantLinear) else m.weight
            if name in ("q5_0", "q5_1", "iq4_nl"):  # loaded as a BlockLinear: the file's bytes, q/k rows unpermuted
                assert isinstance(m, BlockLinear) and torch.equal(m.weight_blocks, mine[n].weight_blocks), n
            # (Q4_1 loads as an IntLinear with the zero -m / d: q * d + m up to float rounding)
            assert torch.allclose(w, mine[n].dequantize(), rtol=0, atol=1e-6), n


def test_a_plan_of_block_types_makes_one_mixed_file(tmp_path, tok):  # noqa: F811
    base = tiny_model()
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    types = ["q4_0", "q5_0", "iq4_nl", "q8_0"]
    plan = Plan(layers={n: types[i % 4] for i, n in enumerate(names)})
    model = lowbit.quantize(base, plan, progress=False)
    report = export_gguf(model, tok, tmp_path / "mix.gguf", "q4_0", progress=False)
    assert report["from_codes"] == len(names)
    kinds = {t.name: t.tensor_type.name for t in read(tmp_path / "mix.gguf").tensors}
    gguf_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
    for i, n in enumerate(names):
        block = n.split(".")[2]
        short = gguf_names[n.split(".", 3)[3]]
        assert kinds[f"blk.{block}.{short}.weight"] == types[i % 4].upper()


def test_export_gptq_onto_a_type_on_the_command_line(tmp_path, tiny_model_dir):  # noqa: F811
    code, out = run("export", tiny_model_dir, "--type", "iq4_nl", "--method", "gptq", "--out", tmp_path / "f.gguf")
    assert code == 0, out
    assert "14 linear weights in their own lowbit codes" in " ".join(out.split())
    kinds = {t.tensor_type.name for t in read(tmp_path / "f.gguf").tensors if t.name.startswith("blk.") and
             len(t.shape) == 2}
    assert kinds == {"IQ4_NL"}
    code, out = run("export", tiny_model_dir, "--type", "q4_0", "--method", "nf4", "--out", tmp_path / "n.gguf")
    assert code == 0 and "rounds those weights again onto q4_0" in out, out


def test_advise_gguf_chooses_block_types_and_export_writes_the_mix(tmp_path, tiny_model_dir):  # noqa: F811
    plan = tmp_path / "plan.json"
    code, out = run("advise", tiny_model_dir, "--gguf", "--bits", "5.5", "--tokens", 512, "--no-measure", "--out", plan)
    assert code == 0, out
    chosen = set(Plan.load(plan).layers.values())
    assert chosen <= {"gptq-q8_0", "gptq-q5_0", "gptq-q4_1", "gptq-q4_0", "gptq-iq4_nl"} and len(chosen) > 1
    code, out = run("export", tiny_model_dir, "--plan", plan, "--type", "q4_0", "--out", tmp_path / "mix.gguf")
    assert code == 0 and "mixed:" in out, out
    bits = params = 0
    for t in read(tmp_path / "mix.gguf").tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bits, params = bits + 8 * int(t.n_bytes), params + int(t.n_elements)
    assert 4.5 <= bits / params <= 5.5
    code, out = run("advise", tiny_model_dir, "--gguf", "--bits", "4.0", "--no-measure", "--out", plan)
    assert code == 2 and "outside what the formats reach" in out
    # the same plan on the model as a GGUF file (loaded to be quantized, not in its own codes)
    code, out = run("export", tiny_model_dir, "--type", "f32", "--out", tmp_path / "src.gguf")
    assert code == 0, out
    code, out = run("export", tmp_path / "src.gguf", "--plan", plan, "--type", "q4_0", "--out", tmp_path / "m2.gguf")
    assert code == 0 and "mixed:" in out, out
    code, out = run("export", tmp_path / "src.gguf", "--method", "native", "--rotate", "--type", "q4_0", "--out",
                    tmp_path / "r.gguf")
    assert code == 2 and "--rotate changes the weights" in out

