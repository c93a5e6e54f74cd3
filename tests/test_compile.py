"""lowbit layers under torch.compile: one custom op each, no graph break, eager's outputs and gradients."""
from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch

import lowbit
from lowbit.kernels import ops

CONFIGS = {
    "nf4": lowbit.NF4Config(),
    "nf4-dq": lowbit.NF4Config(double_quant=True),
    "fp4-bf16": lowbit.NF4Config(quant_type="fp4", compute_dtype=torch.bfloat16),
    "llm-int8": lowbit.Int8Config(),
    "llm-int8-zeropoint": lowbit.Int8Config(activations="zeropoint"),
    "int8-weight": lowbit.Int8Config(weight_only=True),
    "int4-g32": lowbit.IntConfig(bits=4, group_size=32),
    "int3-g32": lowbit.IntConfig(bits=3, group_size=32),
    "ternary": lowbit.TernaryConfig(),
    "gptq3": lowbit.GPTQConfig(bits=3, group_size=32),
    "spqr": lowbit.SpQRConfig(bits=3, outlier_threshold=2.0),
}


def tiny_llama(hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def quantized(name: str):
    model = tiny_llama()
    calibration = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # post-training ternary warns that it is lossy
        lowbit.quantize(model, CONFIGS[name], progress=False, calibration=calibration)
    return model


def block_inputs(model, requires_grad: bool = False):
    x = torch.randn(1, 12, model.config.hidden_size, generator=torch.Generator().manual_seed(1),
                    requires_grad=requires_grad)
    return x, model.model.rotary_emb(x, torch.arange(12)[None])


def first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_compiles_whole_and_matches_eager(name):
    model = quantized(name)
    block = model.model.layers[0]
    x, pe = block_inputs(model)
    with torch.no_grad():
        eager = first(block(x, position_embeddings=pe))
        # fullgraph: any graph break (an untraceable call in a lowbit layer) is an error
        compiled = first(torch.compile(block, fullgraph=True, backend="aot_eager")(x, position_embeddings=pe))
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("name", ["nf4", "llm-int8", "spqr"])
def test_whole_model_has_no_graph_break(name):
    model = quantized(name)
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    ops_in_graphs = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("lowbit.quantized_linear" in str(t) for t in ops_in_graphs) == 14  # each of the 14 layers, once


def test_inductor_model_matches_eager():
    model = quantized("nf4")
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    # inductor fuses the ops around the lowbit layers (norms, attention): float rounding, not equality
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["nf4", "llm-int8", "ternary"])
def test_gradient_through_compiled_block(name):
    model = quantized(name)
    block = model.model.layers[0]
    x, pe = block_inputs(model, requires_grad=True)
    (eager,) = torch.autograd.grad(first(block(x, position_embeddings=pe)).square().sum(), x)
    out = first(torch.compile(block, fullgraph=True, backend="aot_eager")(x, position_embeddings=pe))
    (compiled,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(compiled, eager)  # same ops in the same order: the op's backward is eager's
    assert eager.abs().max() > 0


def test_lora_training_step_compiles():
    peft = pytest.importorskip("peft")
    import lowbit.train  # noqa: F401 - registers lowbit's layers with PEFT

    model = quantized("nf4")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                       init_lora_weights=False))
    lowbit.prepare_for_training(model, gradient_checkpointing=False)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(fn):
        for p in params:
            p.grad = None
        fn(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in params]

    eager = grads(model)
    compiled = grads(torch.compile(model, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(g.abs().max() > 0 for g in eager)


def test_copies_get_their_own_handle_and_freed_layers_are_named():
    model = quantized("nf4")
    layer = model.model.layers[0].self_attn.q_proj
    twin = copy.deepcopy(layer)
    assert twin._op_handle != layer._op_handle and ops.layer_of(twin._op_handle) is twin
    handle = twin._op_handle
    del twin
    gc.collect()
    with pytest.raises(RuntimeError, match="names no live layer"):
        ops.layer_of(handle)
