"""bitsandbytes' 4-bit checkpoint layout: lowbit reads what bitsandbytes (and transformers) write, and back."""
import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.interop import bitsandbytes as interop
from lowbit.nn import Linear4bit

bnb = pytest.importorskip("bitsandbytes")


def bnb_layer(weight, bias, quant_type, double_quant):
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias is not None, compute_dtype=torch.float32,
                              quant_type=quant_type, compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant, blocksize=64)._quantize("cpu")
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return layer


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_layer_to_lowbit_and_back_identical_outputs(real_weights, quant_type, double_quant):
    w = real_weights["down_proj"]
    bias = torch.randn(w.shape[0])
    x = torch.randn(7, w.shape[1])
    theirs = bnb_layer(w, bias, quant_type, double_quant)
    state = theirs.state_dict()
    assert set(state) >= {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"}
    ours = interop.layer_from_bnb(state)
    for mode in ("train", "eval"):  # bitsandbytes computes differently in each mode on CPU
        getattr(theirs, mode)()
        with torch.no_grad(), kernels.reference_only():  # dequantize + matmul, as bitsandbytes does
            assert torch.equal(theirs(x), ours(x)), mode
    with torch.no_grad():  # lowbit's fused kernel sums in another order
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # ... and lowbit's own quantization, exported, is what bitsandbytes would have stored.
    mine = Linear4bit.from_linear(torch.nn.Linear(w.shape[1], w.shape[0]).requires_grad_(False), quant_type, 64, double_quant)
    mine.set_weight(w)
    mine.bias = bias.clone()
    exported = interop.layer_to_bnb(mine)
    assert set(exported) == set(state)
    for key in state:
        if "quant_state" in key:
            assert interop._unpack_json(exported[key]) == interop._unpack_json(state[key])
        elif not (double_quant and key == "weight.absmax"):  # 8-bit second-level codes: see docs/formats.md
            assert torch.equal(exported[key].reshape(state[key].shape), state[key]), key
    back = bnb.nn.Linear4bit(w.shape[1], w.shape[0], True, compute_dtype=torch.float32, quant_type=quant_type)
    back.weight = bnb.nn.Params4bit.from_prequantized(exported["weight"], {k: v for k, v in exported.items() if k.startswith("weight.")},
                                                      device="cpu", module=back)
    back.bias = torch.nn.Parameter(exported["bias"], requires_grad=False)
    for mode in ("train", "eval"):
        getattr(back, mode)()
        with torch.no_grad(), kernels.reference_only():
            assert torch.equal(back(x), mine(x)), mode


def test_transformers_checkpoints_both_ways(tmp_path):
    import transformers

    from test_checkpoint import IDS, logits, tiny_llama

    # Every in_features is a multiple of 64: bitsandbytes 0.50.2's CPU dequantize_4bit kernel reads rows
    # whose length is not a multiple of the blocksize with the wrong absmax (see docs/formats.md).
    tiny_llama().save_pretrained(tmp_path / "fp32")
    # lowbit quantizes, exports; transformers + bitsandbytes load it.
    ours = lowbit.quantize(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fp32").eval(), lowbit.NF4Config(), progress=False)
    interop.save_bnb_checkpoint(ours, tmp_path / "lowbit-export")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lowbit-export").eval()
    assert isinstance(theirs.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    with kernels.reference_only():  # dequantize + matmul, as bitsandbytes does
        assert torch.equal(logits(ours), logits(theirs))
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-4, atol=1e-4)
    # transformers + bitsandbytes quantize and save; lowbit loads it.
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=qc, dtype=torch.float32).eval()
    theirs.save_pretrained(tmp_path / "bnb")
    loaded = interop.load_bnb_checkpoint(tmp_path / "bnb")
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, Linear4bit) and loaded.model.layers[1].self_attn.q_proj.double_quant
    with kernels.reference_only():
        assert torch.equal(logits(theirs), logits(loaded))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_bad_bnb_state():
    lin = torch.nn.Linear(64, 32)
    state = interop.layer_to_bnb(Linear4bit.from_linear(lin, "nf4", 64, True))
    broken = {**state, "weight": state["weight"][:-1]}
    with pytest.raises(ValueError, match="weight: expected torch.uint8 with 1024"):
        interop.layer_from_bnb(broken)
    no_state = {k: v for k, v in state.items() if "quant_state" not in k}
    with pytest.raises(ValueError, match="expected one"):
        interop.layer_from_bnb(no_state)
    with pytest.raises(TypeError, match="nf4/fp4"):
        interop.to_bnb_state_dict(lowbit.quantize(torch.nn.Sequential(lin), lowbit.Int8Config(), progress=False))
