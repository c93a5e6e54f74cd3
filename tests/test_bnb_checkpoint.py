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


# On a CPU with AVX512_BF16, bitsandbytes' eval-mode Linear4bit runs a fused kernel that rounds x and the absmax to
# bf16, sums the products in fp32 and rounds the output to bf16 (it adds the bias in fp32 afterwards); elsewhere, and
# in training mode, it dequantizes and multiplies in fp32 exactly as lowbit's reference path does. So: bit identity
# on the second path (forced with interop.bnb_fused_cpu(.., False) on any CPU), and on the fused path the bound that
# those roundings allow. With u = 2^-8 (bf16's unit roundoff) and S = |x| @ |W|^T, rounding x and the absmax
# perturbs each product by at most (2u + u^2)|x||w|, the output rounding adds u|y|, and two fp32 sums in different
# orders differ by at most 2 K 2^-24 S: |y_bnb - y| <= (2u + u^2 + 2 K 2^-24) S + u |y| (+ u |bias|, since the
# rounded output is y - bias).
U = 2.0 ** -8


def bf16_path_bound(x, layer, y):
    """The largest |y_bnb_fused - y| that the fused bf16 arithmetic allows, elementwise (x, y: [rows, features])."""
    s = x.abs() @ layer.dequantize(torch.float32).abs().t()
    z = y if layer.bias is None else y - layer.bias
    return (2.02 * U + 2 * x.shape[-1] * 2.0 ** -24) * s + U * z.abs() + 2.0 ** -23 * y.abs()


def assert_within_bf16_bound(theirs, ours, x, layer):
    x, ours, theirs = (t.reshape(-1, t.shape[-1]).float() for t in (x, ours, theirs))
    excess = ((theirs - ours).abs() - bf16_path_bound(x, layer, ours)).max().item()
    assert excess <= 0, f"fused bf16 output exceeds its rounding bound by {excess:.3g}"


def emulate_bnb_fused(x, layer):
    """bitsandbytes' fused bf16 arithmetic for a lowbit Linear4bit's weight, in plain torch (runs on any CPU)."""
    w = layer.dequantize(torch.float32).reshape(-1, layer.blocksize)
    absmax = w.abs().amax(1, keepdim=True)  # each block's largest weight is coded as +-1: |it| is the absmax
    w = w / absmax.clamp_min(torch.finfo(torch.float32).tiny) * absmax.bfloat16().float()
    y = (x.bfloat16().float() @ w.reshape(layer.out_features, layer.in_features).t()).bfloat16().float()
    return y if layer.bias is None else y + layer.bias


def assert_matches_emulation(theirs, x, layer):
    """``theirs`` is the emulated fused arithmetic up to its fp32 summation order, which can move an output by
    2 K 2^-24 S before the bf16 rounding and so by one bf16 step (2u |z|) after it."""
    x, theirs = x.reshape(-1, x.shape[-1]).float(), theirs.reshape(-1, theirs.shape[-1]).float()
    emu = emulate_bnb_fused(x, layer)
    z = emu if layer.bias is None else emu - layer.bias
    tol = 2 * U * z.abs() * (1 + U) + 4 * x.shape[-1] * 2.0 ** -24 * (x.abs() @ layer.dequantize().abs().t())
    excess = ((theirs - emu).abs() - tol).max().item()
    assert excess <= 0, f"output differs from the emulated fused bf16 kernel by {excess:.3g} more than summation order allows"


def check_bnb_paths(theirs, ours, x):
    """bitsandbytes layer ``theirs`` against lowbit layer ``ours`` on every path bitsandbytes may take on this CPU."""
    theirs.train()
    with torch.no_grad(), kernels.reference_only():  # dequantize + matmul, as bitsandbytes does in training mode
        assert torch.equal(theirs(x), ours(x)), "train"
    theirs.eval()
    interop.bnb_fused_cpu(theirs, False)
    with torch.no_grad(), kernels.reference_only():
        assert torch.equal(theirs(x), ours(x)), "eval, unfused"
    interop.bnb_fused_cpu(theirs, bnb.functional.has_avx512bf16())  # bitsandbytes' own choice on this CPU
    with torch.no_grad(), kernels.reference_only():
        y_ours, y_theirs = ours(x), theirs(x)
    fused = getattr(theirs.weight.quant_state, "packing_format_for_cpu", False)
    assert fused == bnb.functional.has_avx512bf16()  # we know which path ran
    if fused:
        assert_within_bf16_bound(y_theirs, y_ours, x, ours)
        assert_matches_emulation(y_theirs, x, ours)
    else:
        assert torch.equal(y_theirs, y_ours)
    # What an AVX512_BF16 machine runs, checked on every machine: the emulated fused arithmetic is within the bound.
    assert_within_bf16_bound(emulate_bnb_fused(x, ours), y_ours, x, ours)
    with torch.no_grad():  # lowbit's fused kernel sums in another order
        torch.testing.assert_close(ours(x), y_ours, rtol=1e-5, atol=1e-5)


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
    check_bnb_paths(theirs, ours, x)
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
    check_bnb_paths(back, mine, x)


@pytest.mark.parametrize("scale", [1.5, 1.1])
def test_fused_path_checks_catch_a_wrong_block(real_weights, scale):
    """Both fused-path checks fail when one block's absmax is off (the rounding bound only for a large error)."""
    w = real_weights["down_proj"]
    x = torch.randn(7, w.shape[1])
    ours = Linear4bit.from_linear(torch.nn.Linear(w.shape[1], w.shape[0]).requires_grad_(False), "nf4", 64, False)
    ours.set_weight(w)
    wrong = Linear4bit.from_linear(torch.nn.Linear(w.shape[1], w.shape[0]).requires_grad_(False), "nf4", 64, False)
    wrong.load_state_dict(ours.state_dict())
    wrong.weight_absmax[wrong.weight_absmax.argmax()] *= scale
    with torch.no_grad(), kernels.reference_only():
        y, y_wrong = ours(x), emulate_bnb_fused(x, wrong)
    assert_matches_emulation(emulate_bnb_fused(x, ours), x, ours)
    with pytest.raises(AssertionError, match="summation order"):
        assert_matches_emulation(y_wrong, x, ours)
    assert_within_bf16_bound(emulate_bnb_fused(x, ours), y, x, ours)
    wrong.weight_absmax.mul_(scale)  # every block off by `scale`
    with pytest.raises(AssertionError, match="rounding bound"):
        assert_within_bf16_bound(emulate_bnb_fused(x, wrong), y, x, ours)


def bnb_inputs_and_outputs(model):
    """Record each bitsandbytes Linear4bit's input and output during a forward pass (by module name)."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out))))
    return seen, hooks


def test_transformers_checkpoints_both_ways(tmp_path):
    import transformers

    from test_checkpoint import logits, tiny_llama

    # Every in_features is a multiple of 64: bitsandbytes 0.50.2's CPU dequantize_4bit kernel reads rows
    # whose length is not a multiple of the blocksize with the wrong absmax (see docs/formats.md).
    tiny_llama().save_pretrained(tmp_path / "fp32")
    # lowbit quantizes, exports; transformers + bitsandbytes load it.
    ours = lowbit.quantize(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fp32").eval(), lowbit.NF4Config(), progress=False)
    interop.save_bnb_checkpoint(ours, tmp_path / "lowbit-export")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lowbit-export").eval()
    assert isinstance(theirs.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert interop.bnb_fused_cpu(theirs, False) == 7 * len(theirs.model.layers)
    with kernels.reference_only():  # dequantize + matmul, as bitsandbytes does on this path
        assert torch.equal(logits(ours), logits(theirs))
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-4, atol=1e-4)
    if bnb.functional.has_avx512bf16():  # bitsandbytes' fused bf16 path: each layer within its rounding bound
        interop.bnb_fused_cpu(theirs, True)
        seen, hooks = bnb_inputs_and_outputs(theirs)
        logits(theirs)
        for h in hooks:
            h.remove()
        assert len(seen) == 7 * len(theirs.model.layers)
        for name, (x, y) in seen.items():
            layer = ours.get_submodule(name)
            with torch.no_grad(), kernels.reference_only():
                assert_within_bf16_bound(y, layer(x), x, layer)
    # transformers + bitsandbytes quantize and save; lowbit loads it.
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=qc, dtype=torch.float32).eval()
    theirs.save_pretrained(tmp_path / "bnb")
    loaded = interop.load_bnb_checkpoint(tmp_path / "bnb")
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, Linear4bit) and loaded.model.layers[1].self_attn.q_proj.double_quant
    interop.bnb_fused_cpu(theirs, False)
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
