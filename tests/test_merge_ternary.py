"""merge_and_requantize in every round-to-nearest format, ternary included: the result is the full-precision merge
(base weight + B A * alpha / r, computed here) quantized by lowbit.quantize with the same config."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.nn import IntLinear, QuantLinear
from lowbit.nn.base import replace_module
from test_checkpoint import logits, tiny_llama

peft = pytest.importorskip("peft")
from lowbit.train import LoraQuantLinear, merge_and_requantize, pack_bitnet, to_bitnet  # noqa: E402

# Every linear layer of the model (the head is tied to the embedding, so kept): the reference model is then all
# fp32 where the adapters were, and lowbit.quantize takes it whole.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8
CONFIGS = {"ternary": lowbit.TernaryConfig(), "nf4": lowbit.NF4Config(), "int8": lowbit.Int8Config(),
           "int4": lowbit.NF4Config(quant_type="int4"), "rtn4": lowbit.IntConfig(bits=4, group_size=32)}


def adapted(model: torch.nn.Module):
    """``model`` with a LoRA adapter on every target, B drawn at random (a fresh adapter's B is zero)."""
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    for m in peft_model.modules():
        if isinstance(m, LoraQuantLinear):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    return peft_model.eval()


def quantized(config) -> torch.nn.Module:
    return lowbit.quantize(tiny_llama(), config, progress=False)


def full_precision_merge(peft_model) -> torch.nn.Module:
    """The tiny model with each adapted weight replaced by dequantize() + (B @ A) * alpha / r."""
    reference = tiny_llama()
    for name, m in peft_model.get_base_model().named_modules():
        if isinstance(m, LoraQuantLinear):
            delta = (m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()) * (ALPHA / R)
            with torch.no_grad():
                reference.get_submodule(name).weight.copy_(m.base_layer.dequantize().float() + delta)
    return reference


@pytest.mark.parametrize("name", CONFIGS)
def test_merge_and_requantize_equals_quantizing_the_full_precision_merge(name):
    config = CONFIGS[name]
    peft_model = adapted(quantized(config))
    expected = lowbit.quantize(full_precision_merge(peft_model), config, progress=False)
    base_codes = {path: m.base_layer.qweight.clone() for path, m in peft_model.get_base_model().named_modules()
                  if isinstance(m, LoraQuantLinear)}
    merged = merge_and_requantize(peft_model)
    assert not any(isinstance(m, LoraQuantLinear) for m in merged.modules())
    layers = {path: m for path, m in expected.named_modules() if isinstance(m, QuantLinear)}
    assert layers.keys() == base_codes.keys()
    for path, want in layers.items():  # same type, same settings, same stored tensors
        got = merged.get_submodule(path)
        assert type(got) is type(want) and got.init_kwargs() == want.init_kwargs()
    state, want_state = merged.state_dict(), expected.state_dict()
    assert state.keys() == want_state.keys() and all(torch.equal(state[k], want_state[k]) for k in want_state)
    assert torch.equal(logits(merged), logits(expected))
    # The adapters moved codes: the merge is not the base handed back unchanged.
    assert any(not torch.equal(merged.get_submodule(path).qweight, codes) for path, codes in base_codes.items())


def test_a_layer_trained_as_b158_is_refused_in_one_line():
    model = adapted(pack_bitnet(to_bitnet(tiny_llama())))
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.q_proj normalises its input \(a layer "
                                         r"trained as BitNet b1\.58\)") as err:
        merge_and_requantize(model)
    assert "\n" not in str(err.value)


def test_settings_from_linear_cannot_make_are_refused_not_dropped():
    # GGUF Q4_1 layers hold a float zero point; round to nearest (from_linear) makes integer ones.
    model = quantized(lowbit.IntConfig(bits=4, group_size=32))
    for name, m in list(model.named_modules()):
        if isinstance(m, IntLinear):
            replace_module(model, name, IntLinear.from_codes(m.codes(), m.weight_scale.float(), m.weight_zero.float(),
                                                             None, 4, 32, zero_dtype="float32"))
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.q_proj: IntLinear.from_linear cannot "
                                         r"re-quantize with this layer's settings \{'zero_dtype': 'float32'\}"):
        merge_and_requantize(adapted(model))
